"""``python -m longtrain.launch ...``: the module form used by torchrun and deepspeed."""

import sys

from longtrain.launch.cli import main

sys.exit(main())

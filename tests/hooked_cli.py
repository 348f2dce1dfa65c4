"""``python tests/hooked_cli.py ARGS...``: the ``longtrain`` command with test-only faults.

Faults are chosen by environment variables, so that a test can put a real process in a
situation a cluster produces (a signal in the middle of a stage, a filesystem that stalls
during a save) without any hook in the product code:

- ``HOOK_SIGTERM_AT_CALL=N``: the process sends itself SIGTERM during its N-th optimizer step
  (1-based count of ``train_step`` calls in this process), as a scheduler would.
- ``HOOK_SLOW_SAVE_S=S``: every checkpoint save after the SIGTERM first sleeps S seconds.
- ``HOOK_RECORD_SAVES=FILE``: the ``async_save`` flag of every checkpoint save is appended to
  FILE as one JSON line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import longtrain.train.checkpoint as checkpoint
import longtrain.train.trainer as trainer
from longtrain.launch.cli import main

_calls = {"steps": 0, "signalled": False}
_save, _step = checkpoint.save_checkpoint, trainer.train_step


def _hooked_step(*args, **kwargs):  # type: ignore[no-untyped-def]
    _calls["steps"] += 1
    if _calls["steps"] == int(os.environ.get("HOOK_SIGTERM_AT_CALL", "0")):
        _calls["signalled"] = True
        os.kill(os.getpid(), signal.SIGTERM)
    return _step(*args, **kwargs)


def _hooked_save(*args, **kwargs):  # type: ignore[no-untyped-def]
    record = os.environ.get("HOOK_RECORD_SAVES")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps({"async_save": bool(kwargs.get("async_save"))}) + "\n")
    if _calls["signalled"] and os.environ.get("HOOK_SLOW_SAVE_S"):
        time.sleep(float(os.environ["HOOK_SLOW_SAVE_S"]))
    return _save(*args, **kwargs)


trainer.train_step = _hooked_step
checkpoint.save_checkpoint = _hooked_save

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

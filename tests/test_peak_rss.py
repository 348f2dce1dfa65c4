"""Peak memory on CPU must be the process's own, not its parent's (pytest, a launcher)."""

import subprocess
import sys

PROBE = (
    "import resource; from longtrain.train.metrics import peak_rss_bytes; "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_rss_bytes())"
)


def test_child_peak_rss_ignores_a_large_parent() -> None:
    big = bytearray(1_200_000_000)
    big[:: 1 << 12] = b"\x01" * len(range(0, len(big), 1 << 12))  # touch every page
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    ru_maxrss, ours = (int(v) for v in out.stdout.split())
    del big
    # Control: Linux carries ru_maxrss over fork+exec, so the naive figure shows the parent.
    assert ru_maxrss > 1_200_000_000
    # The child itself imports torch (a few hundred MB) and nothing else.
    assert 0 < ours < 800_000_000, ours

"""``python tests/hooked_cli.py ARGS...``: the ``longtrain`` command with test-only faults.

Faults are chosen by environment variables, so that a test can put a real process in a
situation a cluster produces (a signal in the middle of a stage, a filesystem that stalls or
fills up during a save) without any hook in the product code:

- ``HOOK_SIGTERM_AT_CALL=N``: the process sends itself a signal during its N-th optimizer step
  (1-based count of ``train_step`` calls in this process), as a scheduler would;
  ``HOOK_SIGNAL=INT`` sends SIGINT (Ctrl-C) instead of SIGTERM, ``HOOK_SIGNAL_TIMES=2`` twice.
- ``HOOK_SLOW_SAVE_S=S``: every checkpoint save after the signal first sleeps S seconds.
- ``HOOK_RECORD_SAVES=FILE``: the ``async_save`` flag of every checkpoint save is appended to
  FILE as one JSON line.
- ``HOOK_DISK_FULL_AT_SAVE=N``: from the N-th checkpoint save on, every ``torch.save`` into a
  checkpoint fails the way torch reports a full disk (``inline_container.cc ... unexpected
  pos``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch

import longtrain.train.checkpoint as checkpoint
import longtrain.train.trainer as trainer
from longtrain.launch.cli import main

_calls = {"steps": 0, "saves": 0, "signalled": False}
_save, _step, _torch_save = checkpoint.save_checkpoint, trainer.train_step, torch.save


def _hooked_step(*args, **kwargs):  # type: ignore[no-untyped-def]
    _calls["steps"] += 1
    if _calls["steps"] == int(os.environ.get("HOOK_SIGTERM_AT_CALL", "0")):
        _calls["signalled"] = True
        sig = signal.SIGINT if os.environ.get("HOOK_SIGNAL") == "INT" else signal.SIGTERM
        for _ in range(int(os.environ.get("HOOK_SIGNAL_TIMES", "1"))):
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
    return _step(*args, **kwargs)


def _hooked_save(*args, **kwargs):  # type: ignore[no-untyped-def]
    _calls["saves"] += 1
    record = os.environ.get("HOOK_RECORD_SAVES")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps({"async_save": bool(kwargs.get("async_save"))}) + "\n")
    if _calls["signalled"] and os.environ.get("HOOK_SLOW_SAVE_S"):
        time.sleep(float(os.environ["HOOK_SLOW_SAVE_S"]))
    return _save(*args, **kwargs)


def _hooked_torch_save(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
    full_at = int(os.environ.get("HOOK_DISK_FULL_AT_SAVE", "0"))
    if full_at and _calls["saves"] >= full_at and "/checkpoints/step_" in str(f):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
    return _torch_save(obj, f, *args, **kwargs)


trainer.train_step = _hooked_step
checkpoint.save_checkpoint = _hooked_save
torch.save = _hooked_torch_save

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

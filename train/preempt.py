"""Preemption: a signal on any rank becomes a stop that every rank agrees on at a step boundary.

SLURM (``--signal``), Kubernetes and torchrun announce the end of a job with SIGTERM or
SIGUSR1 some time before they kill it; a person at the terminal presses Ctrl-C (SIGINT). The
first of any of them stops the run at the next step boundary with a checkpoint, like SIGTERM;
a second Ctrl-C exits at once and says which steps are lost. The handler only sets a flag (nothing unsafe runs
inside a signal handler); :meth:`PreemptionHandler.should_stop` all-reduces that flag at the
next step boundary so all ranks leave the loop at the same step, save, and exit 0. A
watchdog ends the process if the deadline passes anyway (a dead peer must not hang the job).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

import torch
import torch.distributed as dist

__all__ = ["PreemptionHandler"]


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1 on any rank into an agreed stop at the next step boundary.

    Args:
        deadline_s: seconds from the first signal by which the process must be gone; after it
            the watchdog exits with code 124 (a save still running then is left incomplete,
            and resume takes the previous complete checkpoint).
        signals: the signals that mean "stop soon".
        group: process group for the agreement (None = the default group).
    """

    def __init__(
        self,
        deadline_s: float = 300.0,
        signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT),
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.deadline_s = deadline_s
        self.signals = signals
        self.group = group
        self.received: int | None = None  # signal number seen by this rank
        self._t0: float | None = None  # monotonic time of the first signal or of agreement
        self._stopping = False
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None
        self.last_saved: str | None = None
        """What a second Ctrl-C names as kept (set by the trainer after each save)."""

    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only, as Python requires)."""
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers and stop the watchdog."""
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # os.write, not logging: logging takes locks that the interrupted code may hold.
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            kept = self.last_saved or "no checkpoint of this run"
            os.write(
                2,
                f"longtrain: interrupted twice: exiting now; the steps after {kept} are "
                "lost\n".encode(),
            )
            os._exit(130)
        if self.received is None:
            self.received = signum
            self._arm()
        again = "; press Ctrl-C again to exit at once" if signum == signal.SIGINT else ""
        os.write(
            2,
            f"longtrain: received {signal.Signals(signum).name}, stopping at the next step "
            f"and saving{again}\n".encode(),
        )

    def _arm(self) -> None:
        if self._t0 is None:
            self._t0 = time.monotonic()
            self._watchdog = threading.Timer(self.deadline_s, self._expire)
            self._watchdog.daemon = True
            self._watchdog.start()

    def _expire(self) -> None:
        os.write(
            2,
            f"longtrain: preemption deadline of {self.deadline_s:.0f}s passed; exiting\n".encode(),
        )
        os._exit(124)

    def should_stop(self) -> bool:
        """Collective: True on every rank once any rank has received a signal.

        Call it on all ranks at each step boundary; it costs one 1-element all-reduce.
        """
        if self._stopping:
            return True
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend(self.group) == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self._stopping = bool(flag.item())
        if self._stopping:
            self._arm()
        return self._stopping

    def time_left(self) -> float:
        """Seconds left before the deadline (inf before any signal)."""
        if self._t0 is None:
            return float("inf")
        return self.deadline_s - (time.monotonic() - self._t0)

    def finish(self) -> None:
        """Call after the final save: cancels the watchdog so the process exits normally."""
        if self._watchdog is not None:
            self._watchdog.cancel()

"""A per-rank watchdog: a step (or eval, or save) that makes no progress ends the job with a clear error.

A dead or stuck rank leaves the others waiting inside a collective. NCCL's own timeout aborts the process
without saying where training was, and gloo may wait its full timeout; this thread names the rank, the phase
and the step, then exits so the launcher tears the job down (instead of a job that hangs until its wall time).
"""

from __future__ import annotations

import os
import sys
import threading
import time

from dtrain.errors import EXIT_HUNG


class StepWatchdog:
    """Call :meth:`beat` whenever training moves on (a new step, eval, checkpoint save, generation)."""

    def __init__(self, timeout_s: float, rank: int, poll_s: float = 1.0):
        self.timeout_s = timeout_s
        self.rank = rank
        self.poll_s = min(poll_s, timeout_s / 4)
        self._phase = "start-up"
        self._since = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dtrain-watchdog", daemon=True)
        self._thread.start()

    def beat(self, phase: str) -> None:
        self._phase, self._since = phase, time.monotonic()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            waited = time.monotonic() - self._since
            if waited > self.timeout_s:
                sys.stderr.write(
                    f"dtrain: error: rank {self.rank} made no progress for {waited:.0f} s in {self._phase} "
                    f"(train.step_timeout_minutes={self.timeout_s / 60:g}); it is waiting in a collective for a rank "
                    "that died or hangs (see the other ranks' errors above), or the step is slower than the timeout\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_HUNG)

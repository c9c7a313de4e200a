"""Graceful preemption: a signal sets a flag; at the next step boundary all ranks agree, save and exit.

SLURM sends SIGUSR1 (``#SBATCH --signal=USR1@300``) or SIGTERM before it kills a job. The handler only sets a
flag (no I/O in a signal handler); the trainer calls :meth:`PreemptionFlag.agreed` once per step, one
reduction, so a signal seen by any single rank stops every rank at the same step.
"""

from __future__ import annotations

import signal
from typing import Optional

import torch

from dtrain.dist import all_reduce_sum

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Installs the handlers on construction; ``agreed()`` is a collective."""

    def __init__(self, device: torch.device):
        self.device = device
        self.signal_name: Optional[str] = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, failed: bool = False) -> tuple[bool, bool]:
        """(any rank received a signal, any rank passed ``failed=True``), the same on every rank: a sync point that
        all ranks call. ``failed`` carries a rank's reason to stop (rank 0's metrics file hit a full disk)."""
        signals, failures = all_reduce_sum([1.0 if self.signal_name else 0.0, 1.0 if failed else 0.0], self.device)
        return signals > 0, failures > 0

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

    def agreed(self) -> bool:
        """True on every rank when any rank has received a signal (a sync point: all ranks call it)."""
        (votes,) = all_reduce_sum([1.0 if self.signal_name else 0.0], self.device)
        return votes > 0

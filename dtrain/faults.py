"""Fault injection for the recovery tests: the real failure, triggered at a chosen step and rank.

Set through environment variables (never through the config, so no experiment file can switch them on):

    DTRAIN_FAULT_NONFINITE_LOSS=<step>:<rank>   that rank's loss of that optimizer step becomes +Inf
    DTRAIN_FAULT_KILL=<step>:<rank>             that rank SIGKILLs itself at the start of that step
    DTRAIN_FAULT_KILL_IN_SAVE=<step>:<rank>     that rank SIGKILLs itself while writing that step's checkpoint
    DTRAIN_FAULT_SIGNAL=<step>:<rank>:<name>    that rank receives signal <name> (TERM, USR1) at the start of that step
    DTRAIN_FAULT_HANG=<step>:<rank>             that rank sleeps forever at the start of that step
    DTRAIN_FAULT_OOM=<step>:<rank>              that rank raises torch.OutOfMemoryError in that step
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Optional


@functools.cache
def _target(var: str) -> Optional[list[str]]:
    """Read once per process: these checks run every step."""
    value = os.environ.get(var)
    return value.split(":") if value else None


def _hits(var: str, step: int, rank: int) -> Optional[list[str]]:
    target = _target(var)
    if target and int(target[0]) == step and int(target[1]) == rank:
        return target
    return None


def loss_multiplier(step: int, rank: int) -> float:
    return float("inf") if _hits("DTRAIN_FAULT_NONFINITE_LOSS", step, rank) else 1.0


def at_step_start(step: int, rank: int) -> None:
    """Called by every rank before optimizer step ``step`` (1-based) does any work."""
    if _hits("DTRAIN_FAULT_KILL", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    hit = _hits("DTRAIN_FAULT_SIGNAL", step, rank)
    if hit:
        os.kill(os.getpid(), getattr(signal, f"SIG{hit[2]}"))
    if _hits("DTRAIN_FAULT_OOM", step, rank):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory (injected by DTRAIN_FAULT_OOM)")
    if _hits("DTRAIN_FAULT_HANG", step, rank):
        while True:
            time.sleep(60)


def maybe_crash_in_save(step: int, rank: int) -> None:
    if _hits("DTRAIN_FAULT_KILL_IN_SAVE", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)

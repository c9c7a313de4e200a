"""Fault injection for the recovery tests: the real failure, triggered at a chosen step and rank.

Set through environment variables (never through the config, so no experiment file can switch them on):

    DTRAIN_FAULT_NONFINITE_LOSS=<step>:<rank>   that rank's loss of that optimizer step becomes +Inf
    DTRAIN_FAULT_KILL=<step>:<rank>             that rank SIGKILLs itself at the start of that step
    DTRAIN_FAULT_KILL_IN_SAVE=<step>:<rank>     that rank SIGKILLs itself while writing that step's checkpoint
    DTRAIN_FAULT_SIGNAL=<step>:<rank>:<name>    that rank receives signal <name> (TERM, USR1) at the start of that step
    DTRAIN_FAULT_HANG=<step>:<rank>             that rank sleeps forever at the start of that step
    DTRAIN_FAULT_OOM=<step>:<rank>              that rank raises torch.OutOfMemoryError in that step
    DTRAIN_FAULT_PAUSE=<step>:<rank>:<file>     that rank waits at the start of that step until <file> exists (a
                                                run kept alive while a test launches another job beside it)
    DTRAIN_FAULT_ENOSPC=<target>:<n>[:<rank>]   a write fails with OSError(ENOSPC) after writing part of its bytes:
                                                checkpoint:<step>:<rank> (a DeepSpeed engine file of that save),
                                                export:<n> (the n-th weights file), store:<n> (the n-th append to
                                                the token store), metrics:<n> (the n-th record); any rank when
                                                <rank> is left out
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union


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
    hit = _hits("DTRAIN_FAULT_PAUSE", step, rank)
    if hit:
        while not Path(hit[2]).exists():
            time.sleep(0.2)


def maybe_crash_in_save(step: int, rank: int) -> None:
    if _hits("DTRAIN_FAULT_KILL_IN_SAVE", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def no_space(
    target: str, n: int, rank: Optional[int], path: Union[str, Path], data: bytes = b"", write: Optional[Callable[[bytes], object]] = None
) -> None:
    """Raise OSError(ENOSPC) for the ``n``-th write of ``target`` (on ``rank``), after writing half of ``data`` to
    ``path`` (or through ``write``): what a filesystem that fills up mid-write leaves behind."""
    spec = _target("DTRAIN_FAULT_ENOSPC")
    if not spec or spec[0] != target or int(spec[1]) != n:
        return
    if len(spec) > 2 and rank is not None and int(spec[2]) != rank:
        return
    if data:
        (write or Path(path).write_bytes)(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by DTRAIN_FAULT_ENOSPC)", str(path))


@contextmanager
def engine_writes_fail(engine, step: int, rank: int) -> Iterator[None]:
    """Inside the block, the DeepSpeed engine's first file write of checkpoint ``step`` fails with ENOSPC on the
    rank ``DTRAIN_FAULT_ENOSPC=checkpoint:<step>:<rank>`` names, leaving that file half-written (a no-op otherwise)."""
    spec = _target("DTRAIN_FAULT_ENOSPC")
    if not spec or spec[0] != "checkpoint" or int(spec[1]) != step:
        yield
        return
    writer = engine.checkpoint_engine
    original = writer.save

    def save(state_dict, path):
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        no_space("checkpoint", step, rank, path, buffer.getvalue())
        original(state_dict, path)

    writer.save = save
    try:
        yield
    finally:
        writer.save = original

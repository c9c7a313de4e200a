"""One writer per run directory: ``<output_dir>/dtrain.lock``, held by the job's global rank 0 for its whole life.

    deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu output_dir=outputs/x   # a second launch there: exit 16

Only rank 0 takes the lock, before any rank writes into the directory; the others learn the outcome from a
broadcast, so the ranks and nodes of one job never refuse each other and a refused job stops on every rank.
A second job into the same directory (a resubmitted SLURM job, a sweep typo) is refused naming the holder; a
lock left by a dead job is taken over (``dtrain.locks``). ``launch/sweep.py`` checks it before launching a job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from dtrain.errors import RunDirBusy
from dtrain.locks import STALE_S, LockFile, dead_because, read_holder

LOCK_NAME = "dtrain.lock"


def busy_message(run_dir: Path, holder_description: str) -> str:
    return (
        f"output_dir {run_dir} is in use by another job ({holder_description}); two jobs writing one run directory "
        "would mix their checkpoints and metrics. Wait for it to end, or use another output_dir. A lock whose holder "
        f"is dead is taken over by the next launch (same host: once its PID is gone; another host: after {STALE_S:.0f} s "
        f"without a heartbeat); remove {run_dir / LOCK_NAME} by hand only if you are sure that job is gone"
    )


def acquire_run_lock(run_dir: Path, attempts: int = 3) -> LockFile:
    """Take ``run_dir``'s lock for this process (rank 0), taking over a dead holder's (``took_over`` says so: log it).

    Raises:
        RunDirBusy: a live job holds it (the message names its host, PID, job id and since when).
    """
    lock = LockFile(run_dir / LOCK_NAME, f"output_dir {run_dir}")
    for _ in range(attempts):
        if lock.try_create():
            return lock
        holder = read_holder(lock.path)
        if holder is None:  # released between the two looks
            continue
        reason = dead_because(holder)
        if reason is None:
            raise RunDirBusy(busy_message(run_dir, holder.describe()))
        if lock.take_over(holder, reason, quiet=True):  # the caller logs ``took_over`` once logging is set up
            return lock
    holder = read_holder(lock.path)
    raise RunDirBusy(busy_message(run_dir, holder.describe() if holder else "another process, racing for it"))


def run_dir_busy(run_dir: Path) -> Optional[str]:
    """The refusal a launch into ``run_dir`` would get now (None: free, or held by a dead job)."""
    holder = read_holder(Path(run_dir) / LOCK_NAME)
    if holder is None or dead_because(holder) is not None:
        return None
    return busy_message(Path(run_dir), holder.describe())

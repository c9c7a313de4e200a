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

from dtrain.disk import failed_path, is_no_space, no_space_error
from dtrain.dist import DistInfo, broadcast_object
from dtrain.errors import DiskFull, RunDirBusy
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


def claim_run_directory(run_dir: Path, dist: DistInfo) -> Optional[LockFile]:
    """Make ``run_dir`` and take its lock on rank 0; every rank learns the outcome (a collective: every rank calls it).

    Returns:
        The lock on rank 0 (``took_over`` set when a dead job's was taken: log it), None on the other ranks.

    Raises:
        RunDirBusy: Another live job holds the directory (on every rank; nothing was written).
        DiskFull: The lock file could not be written for space (on every rank).
    """
    lock, refused = None, None
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = acquire_run_lock(run_dir)
        except RunDirBusy as e:
            refused = ("busy", str(e))
        except OSError as e:
            if not is_no_space(e):
                raise
            refused = ("disk", str(no_space_error(failed_path(e, run_dir), "the run directory's lock", None)))
    # Sync point: the run directory exists and is this job's before any rank opens a file in it; a refusal
    # reaches every rank (one job's ranks never take the lock themselves, so they cannot refuse each other).
    refused = broadcast_object(refused)
    if refused:
        raise (RunDirBusy if refused[0] == "busy" else DiskFull)(refused[1], every_rank=True)
    return lock


def run_dir_busy(run_dir: Path) -> Optional[str]:
    """The refusal a launch into ``run_dir`` would get now (None: free, or held by a dead job)."""
    holder = read_holder(Path(run_dir) / LOCK_NAME)
    if holder is None or dead_because(holder) is not None:
        return None
    return busy_message(Path(run_dir), holder.describe())

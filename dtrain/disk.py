"""Disk space: free-space checks before big writes, a full disk as one message, and the run's needs up front.

    deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu      # logs "disk: ..." at start, checks before each save

A full filesystem (``ENOSPC``) or quota (``EDQUOT``) surfaces deep inside a library as anything from an
``OSError`` to PyTorch's ``basic_ios::clear: iostream error``. Each writer of the run (checkpoint, export, token
store, metrics, report) goes through :func:`writing` or :func:`no_space_error`, which turn it into a
:class:`~dtrain.errors.DiskFull` naming the path, the bytes free and the bytes the write needed (exit code 28).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from dtrain.errors import DiskFull

log = logging.getLogger("dtrain")

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What PyTorch's C++ writer says when a write fails (the errno is lost on the way): only a disk-full sign when
# the filesystem is short of space as well.
TORCH_WRITE_FAILURES = ("iostream error", "unexpected pos", "PytorchStreamWriter failed", "file write failed")


def free_bytes(path: Union[str, Path]) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def format_bytes(n: Optional[int]) -> str:
    """``5.5 MB (5,524,863 bytes)``: readable and exact."""
    if n is None:
        return "an unknown number of bytes"
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (0 when missing)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


# How libraries that lose the errno word it (safetensors passes Rust's io::Error on as text).
NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")


def is_no_space(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is ENOSPC or EDQUOT."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
            return True
        if not isinstance(error, OSError) and any(w in str(error) for w in NO_SPACE_WORDS):
            return True
        error = error.__cause__ or error.__context__
    return False


def looks_like_failed_write(error: BaseException) -> bool:
    """ENOSPC/EDQUOT, or PyTorch's writer failing without an errno (then only the free space can tell why)."""
    return is_no_space(error) or (isinstance(error, RuntimeError) and any(s in str(error) for s in TORCH_WRITE_FAILURES))


def no_space_error(path: Union[str, Path], what: str, needed: Optional[int], free: Optional[int] = None) -> DiskFull:
    """The error for a write of ``what`` at ``path`` that needs ``needed`` bytes (None: unknown) and cannot fit."""
    free = free_bytes(path) if free is None else free
    return DiskFull(
        f"no space left on device for {what}: {path}: {format_bytes(free)} free on its filesystem, the write needs "
        f"{format_bytes(needed) if needed is not None else 'more than that'}. Free some space "
        "(or raise the quota), or point output_dir / data.cache_dir to a larger filesystem"
    )


def check_free(path: Union[str, Path], needed: int, what: str) -> None:
    """Raise :class:`DiskFull` unless the filesystem of ``path`` has ``needed`` bytes free (before a write starts)."""
    free = free_bytes(path)
    if free < needed:
        raise no_space_error(path, what, needed, free)


@contextmanager
def writing(path: Union[str, Path], what: str, needed: Optional[int] = None) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside the block into :class:`DiskFull` for ``path`` (other errors pass)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_no_space(e):
            raise no_space_error(failed_path(e, path), what, needed) from e
        raise


def failed_path(error: BaseException, default: Union[str, Path]) -> Union[str, Path]:
    """The file a failed write names (an ``OSError``'s ``filename`` in the chain), else ``default``."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.filename:
            return error.filename
        error = error.__cause__ or error.__context__
    return default


def atomic_write_text(path: Path, text: str, what: str) -> None:
    """Write ``path`` under a temporary name and rename it into place: a full disk never leaves it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path, what, len(text.encode())):
            tmp.write_text(text)
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def publish_folder(staging: Path, target: Path) -> None:
    """Rename the complete ``staging`` folder to ``target``; an earlier ``target`` is replaced only at that moment
    (moved aside, the new one renamed in, then the old one removed), so a complete folder is always there."""
    if target.exists():
        old = target.with_name(target.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old)
    else:
        os.rename(staging, target)


# ---------------------------------------------------------------------------------------------- a run's needs


def checkpoint_bytes_estimate(job, shape) -> int:
    """One checkpoint of every rank, from the planner's byte counts, before the first save tells the real size: the
    optimizer's fp32 master copy, m and v of the trained weights (``dtrain.memory.plan``), and under ZeRO-1/2 the
    module in the training dtype as well (only the trained weights under LoRA: frozen ones are excluded). ZeRO-3
    keeps the weights in its fp32 partitions alone (measured: within 5% on the tiny model, ZeRO-2 and -3).
    """
    from dtrain.config.schema import OptimName
    from dtrain.memory.plan import DTYPE_BYTES

    dtype_bytes = DTYPE_BYTES.get(job.precision.name, 2)
    adapters = job.peft.uses_adapters
    trainable = shape.lora_parameters(job.peft.r) if adapters else shape.num_parameters
    per_trained = 12 if job.optim.name == OptimName.adamw else 4 + 2 + 8 / 256
    module = 0 if job.zero.stage == 3 else trainable * dtype_bytes
    return int(module + trainable * per_trained)


def export_bytes_estimate(job, shape) -> int:
    """``final/``: every weight in the training dtype, or the LoRA adapter alone."""
    from dtrain.memory.plan import DTYPE_BYTES

    dtype_bytes = DTYPE_BYTES.get(job.precision.name, 2)
    return (shape.lora_parameters(job.peft.r) if job.peft.uses_adapters else shape.num_parameters) * dtype_bytes


def checkpoints_at_once(every_steps: int, keep_last: int, total_steps: int) -> int:
    """The most checkpoints on disk at one time in a run: the kept ones plus the one being written (the final save
    included). A resumed run counts the ones already written (``disk_needs`` subtracts their bytes)."""
    saves = (total_steps // every_steps + (total_steps % every_steps != 0)) if every_steps else 1
    return min(saves, keep_last + 1) if keep_last > 0 else saves


def disk_needs(run_dir: Path, checkpoint_bytes: int, checkpoints: int, export_bytes: int, store: Optional[Path] = None) -> tuple[str, bool]:
    """A line saying what the run will write into ``run_dir`` and whether its filesystem can hold it.

    Checkpoints already in the run directory count as written (a resumed run replaces them in turn).

    Returns:
        (the line, whether the free space is enough).
    """
    existing = directory_bytes(run_dir / "checkpoints") + directory_bytes(run_dir / "final")
    needed = max(0, checkpoints * checkpoint_bytes + export_bytes - existing)
    free = free_bytes(run_dir)
    store_part = f", token store {format_bytes(directory_bytes(store))} (written)" if store is not None and store.is_dir() else ""
    line = (
        f"disk: the run writes about {format_bytes(needed)} more into {run_dir} ({checkpoints} checkpoint(s) of "
        f"{format_bytes(checkpoint_bytes)} at once, export {format_bytes(export_bytes)}{store_part}); {format_bytes(free)} free"
    )
    return line, free >= needed


def report_disk_needs(run_dir: Path, checkpoint_bytes: int, checkpoints: int, export_bytes: int, store: Optional[Path] = None) -> bool:
    """Log :func:`disk_needs` (a warning when the filesystem is too small); returns whether it fits."""
    line, fits = disk_needs(run_dir, checkpoint_bytes, checkpoints, export_bytes, store)
    if fits:
        log.info("%s", line)
    else:
        log.warning(
            "%s: NOT enough. The run will stop with exit code 28 (before a checkpoint save that cannot fit); free "
            "space, lower ckpt.keep_last, or point output_dir to a larger filesystem",
            line,
        )
    return fits


def plan_disk_use(job, shape, total_steps: int, run_dir: Path, store: Optional[Path], is_main: bool) -> int:
    """The bytes one checkpoint is expected to take before the first save tells (``checkpoint_bytes_estimate``); rank
    0 also logs the run's disk needs (checkpoints kept at once, the export, the store) and warns when they do not fit."""
    expected = checkpoint_bytes_estimate(job, shape)
    if is_main:
        at_once = checkpoints_at_once(job.ckpt.every_steps, job.ckpt.keep_last, total_steps)
        report_disk_needs(run_dir, expected, at_once, export_bytes_estimate(job, shape), store)
    return expected

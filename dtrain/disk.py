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


def is_no_space(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is ENOSPC or EDQUOT."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
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
        f"{'at least ' if needed is None else ''}{format_bytes(needed) if needed is not None else 'more'}. Free some space "
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
            raise no_space_error(path, what, needed) from e
        raise


def atomic_write_text(path: Path, text: str, what: str) -> None:
    """Write ``path`` under a temporary name and rename it into place: a full disk never leaves it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path, what, len(text.encode())):
            tmp.write_text(text)
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)

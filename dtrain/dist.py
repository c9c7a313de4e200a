"""Process-group set-up, rank-aware logging and the few reductions the trainer needs.

Every helper here that communicates is a collective: all ranks must call it, in the same order.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional, Sequence

import torch
import torch.distributed as torch_dist

from dtrain.errors import DtrainError, PeerLost, exit_on_error

log = logging.getLogger("dtrain")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1
    """Ranks on this node (GPUs per node)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        """Nodes in the job (every launcher starts the same number of ranks)."""
        return max(1, self.world_size // max(1, self.local_world_size))


def init_distributed(timeout_minutes: int = 30) -> DistInfo:
    """Initialise the default process group through DeepSpeed (NCCL on GPUs, gloo/ccl on CPU).

    Reads ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set by the ``deepspeed`` launcher (or torchrun); a plain
    ``python`` run becomes a world of one.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    accelerator = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    if accelerator.device_name() == "cuda":
        accelerator.set_device(local_rank)
    if accelerator.device_name() == "cpu":
        _skip_deepspeed_shm_allreduce()
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=accelerator.communication_backend_name(),
            timeout=timedelta(minutes=timeout_minutes),
        )
    device_name = accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu"
    local_world = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or os.environ["WORLD_SIZE"])
    if device_name == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one host share its cores: more threads than cores makes every op (and gloo) crawl.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return DistInfo(
        rank=torch_dist.get_rank(),
        local_rank=local_rank,
        world_size=torch_dist.get_world_size(),
        device=torch.device(device_name),
        local_world_size=local_world,
    )


def _skip_deepspeed_shm_allreduce() -> None:
    """CPU runs reduce through gloo, without DeepSpeed's shared-memory all-reduce op.

    That op is JIT-compiled at start-up (a minute or more on a fresh machine; a build killed midway leaves a lock
    that hangs every later run), and each launch leaves two 69 MB ``/dev/shm/deepspeed_allreduce_buffer_*``
    segments that nothing removes: 330 of them (22 GB of RAM) had piled up on the dev machine. Must run before
    ``deepspeed.init_distributed`` builds its backend.
    """
    import importlib

    # importlib, not ``import deepspeed.comm.torch as ...``: deepspeed.comm re-exports ``torch``, so that import
    # statement would bind the torch package itself.
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    ds_comm_torch.build_shm_op = lambda: None


def setup_logging(dist: DistInfo, log_file: Optional[Path] = None) -> None:
    """Rank 0 logs INFO to stdout (and ``log_file``); other ranks only warnings and errors, tagged with their rank."""
    log.handlers.clear()
    log.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[dtrain rank{dist.rank}] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if dist.is_main else logging.WARNING)
    if dist.is_main and log_file is not None:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_handler)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks in one collective (a host-device sync point)."""
    # float64: token counts and loss sums of a large global batch stay exact.
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest of one integer over all ranks (a collective: every rank calls it)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_gather_objects(obj):
    """Gather one picklable object from every rank, in rank order."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return [obj]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (others pass anything, e.g. None)."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main_rank(dist: DistInfo, work: Callable[[], object], error: type[Exception]) -> None:
    """Run ``work`` on rank 0 only; if it raises ``error``, every rank raises it (a broadcast: all stop together)."""
    problem = None
    if dist.is_main:
        try:
            work()
        except error as e:
            problem = str(e)
    problem = broadcast_object(problem)
    if problem:
        raise error(problem, every_rank=True) if issubclass(error, DtrainError) else error(problem)


def leave_process_group() -> None:
    """Tear the process group down on this rank (an exit with one still up can abort in gloo's threads)."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


@contextmanager
def exit_rank_on_error() -> Iterator[None]:
    """:func:`dtrain.errors.exit_on_error` for a training rank: the one-line message, then :func:`end_rank`.

    A rank that stops on an error leaves by ``os._exit``, not through the interpreter's teardown. That teardown
    destroys the process groups DeepSpeed still references, and gloo's (or NCCL's) C++ destructors can abort while a
    peer is leaving too (SIGABRT, "terminate called without an active exception"): the launcher then reports -6 for
    the rank, and the job exits 250 instead of the error's own code (2: bad data, 28: disk full, ...).

    A rank that stopped only because a peer was lost (:class:`dtrain.errors.PeerLost`) waits a few seconds before
    it leaves (after its message, before its exit handlers), so that the launcher, polling once a second, finds the
    lost peer's exit first and reports that code: the cause, not this consequence.
    """
    grace_s = 0.0
    try:
        with exit_on_error():
            try:
                yield
            except PeerLost as lost:
                grace_s = lost.grace_s
                raise
    except SystemExit as stop:
        time.sleep(grace_s)
        end_rank(stop.code if isinstance(stop.code, int) else 1)


def end_rank(code: int) -> NoReturn:
    """Leave this process now with ``code``: the exit handlers run, the interpreter's teardown does not.

    A training rank ends here after an error (:func:`exit_rank_on_error`) and after a finished run, once the trainer
    has closed its files and left the process group.

    The ``atexit`` handlers are what an error exit still needs: they release the run directory's lock
    (``dtrain/locks.py``) and flush the log handlers; a W&B run is finished first, with the error's code. What is
    skipped is the finalisation of objects and modules, where the process groups' destructors can abort. Nothing else
    is left to do: checkpoints are committed or left as ``.partial`` folders a resume ignores, and peers still in a
    collective fail on the closed connection or are ended by the launcher.
    """
    import atexit

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish(exit_code=code)
        except Exception as e:  # a W&B failure must not replace the error's exit code
            log.warning("W&B did not finish cleanly: %s", e)
    atexit._run_exitfuncs()  # exceptions in a handler are printed, as at a normal exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def free_port() -> int:
    """A TCP port free on this machine now, for a launch's ``--master_port`` (two local launches must differ)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

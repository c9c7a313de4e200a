"""Everything one training job needs before its first step, built on every rank by :func:`build_run`.

    deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu

The order is the set-up's contract: check the config, join the job, load and audit the data, resolve what the
config leaves open (packing, batch sizes), refuse a checkpoint from other settings, write ``config.yaml`` and
``ds_config.json`` (what runs), price the memory, then load the model into the DeepSpeed engine and restore.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from dtrain.checkpoint import CKPT_DIRNAME, CheckpointManager, TrainerState, find_checkpoint
from dtrain.config.schema import JobConfig, Precision
from dtrain.data.loader import TrainLoader
from dtrain.ds_config import build_ds_config
from dtrain.engine import EngineParts, build_engine, read_model_shape
from dtrain.memory.meters import gpu_capacity_bytes_here, peak_memory_bytes
from dtrain.memory.plan import MemoryPlan, ModelShape, format_plans, plan_for_run
from dtrain.oom import oom_report
from dtrain.resolve import agreed_machine_facts, resolve_job
from dtrain.setup import RunData, checkpoint_manager, load_data, prepare_resume, start_run, write_run_files
from dtrain.throughput import peak_flops

if TYPE_CHECKING:  # types only: the lock is taken in dtrain.setup.start_run, this rank joined there
    from dtrain.dist import DistInfo
    from dtrain.locks import LockFile

log = logging.getLogger("dtrain")


@dataclass
class Run:
    """One job, set up: the resolved config, this rank, the data, the engine and where training stands."""

    job: JobConfig
    """Resolved: ``config.yaml`` holds exactly this."""
    dist: DistInfo
    run_dir: Path
    data: RunData
    loader: TrainLoader
    total_steps: int
    shape: ModelShape
    """The model's sizes from its config (planner, MFU, OOM advice)."""
    memory_plan: MemoryPlan
    peak_flops: Optional[float]
    """Peak FLOP/s of one device for MFU (None: unknown, e.g. CPU)."""
    parts: EngineParts
    ckpt: CheckpointManager
    state: TrainerState
    resumed: bool
    lock: Optional[LockFile] = None
    """The run directory's lock (rank 0; released by ``Trainer.close`` or at exit)."""

    @property
    def engine(self) -> Any:
        return self.parts.engine

    def oom_report(self, step: int) -> str:
        """The message after an out-of-memory error, on the failing rank only (no collective)."""
        peak = peak_memory_bytes().get("peak_cuda_reserved")
        return oom_report(
            self.job,
            self.shape,
            self.dist.world_size,
            self.dist.local_world_size,
            self.memory_plan.capacity_bytes,
            peak,
            self.dist.rank,
            step,
        )


def build_run(job: JobConfig) -> Run:
    """Set up ``job`` on this rank (every rank calls it; collectives inside).

    Raises:
        ConfigError, DataError: Bad config or data, found before any model is loaded.
    """
    dist, run_dir, lock = start_run(job)
    data = load_data(job, dist)
    # Rank 0's machine decides precision=auto for all: ranks that chose differently could not train together.
    machine = agreed_machine_facts(dist)
    found = find_checkpoint(run_dir / CKPT_DIRNAME, job.ckpt, dist)
    layout = found.layout if found else None
    resolved = resolve_job(job, data.data.train.lengths, dist.world_size, machine, layout, formats=data.data.formats)
    job = resolved.job
    # Before anything is (over)written: a checkpoint from other settings is refused here, not after loading.
    ckpt = checkpoint_manager(run_dir, job, dist, found)
    universal = prepare_resume(found, job, dist)
    loader = TrainLoader(
        data.data.train,
        resolved.batch,
        dist.rank,
        packing=bool(job.data.packing),
        max_seq_len=job.data.max_seq_len,
        seed=job.train.seed,
        grouping=job.data.group_by_length,
        pad_token_id=data.tokenizer.pad_token_id,
        weights=data.weights,
    )
    total_steps = job.train.max_steps or job.train.epochs * loader.steps_per_epoch
    shape = read_model_shape(job, data.data)
    on_gpu = torch.cuda.is_available()
    ds_config = build_ds_config(job, resolved.batch, hidden_size=shape.hidden, num_parameters=shape.num_parameters, cuda_available=on_gpu)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}  # this start only: later saves are ordinary checkpoints
    write_run_files(resolved, ds_config, run_dir, dist)
    loader.log_plan(data.data, total_steps)
    memory_plan = plan_for_run(job, shape, dist.world_size, dist.local_world_size, ds_config, gpu_capacity_bytes_here())
    log.info("memory plan per %s (launch/plan.py prices the alternatives):\n%s", "GPU" if on_gpu else "rank", format_plans([memory_plan]))
    device_name = torch.cuda.get_device_name() if on_gpu else None
    parts = build_engine(job, ds_config, shape, total_steps, dist.device, len(data.data.source_names))
    ckpt.plan_disk_use(job, shape, total_steps, getattr(data.data.train, "folder", None))
    state = ckpt.restore(parts.engine, found.path, universal, job.train.seed) if found is not None else TrainerState()
    if job.ckpt.every_steps:
        log.info("checkpoints: every %d steps into %s, keeping the last %d", job.ckpt.every_steps, ckpt.root, job.ckpt.keep_last)
    return Run(
        job,
        dist,
        run_dir,
        data,
        loader,
        total_steps,
        shape,
        memory_plan,
        peak_flops(device_name, job.precision.name == Precision.fp32, job.train.peak_tflops),
        parts,
        ckpt,
        state,
        resumed=found is not None,
        lock=lock,
    )

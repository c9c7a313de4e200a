"""The resolution step: a job's open choices are decided once, before anything is written or loaded.

``data.packing=null`` is decided from the data, batch sizes are derived from ``train.*`` and the world size,
``precision=auto`` from the machine (rank 0's, broadcast) and ``wandb.mode=null`` from W&B's environment. Every
rank decides alike (same data, config, machine facts and environment). What
comes out is what runs: ``config.yaml``, ``ds_config.json`` and the checkpoint resume key are all written from
it, so resuming with the values a run actually used (``data.packing=true`` after ``null`` chose packing) works.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from dtrain.config.batch import BatchPlan
from dtrain.config.schema import DataFormat, JobConfig, Precision, WandbMode
from dtrain.data.mixture import EVAL_PATH_SOURCE, data_sources
from dtrain.data.packing import choose_packing
from dtrain.metrics import wandb_mode
from dtrain.reshard import accumulation_for

log = logging.getLogger("dtrain")


@dataclass(frozen=True)
class ResolvedJob:
    """The job as it runs: no open choice left."""

    job: JobConfig
    batch: BatchPlan
    decisions: tuple[str, ...] = ()
    """What was decided and why, one log line each."""

    def config_yaml(self) -> str:
        """``config.yaml`` of the run directory: the resolved job, loadable with ``load_run_config``."""
        return OmegaConf.to_yaml(OmegaConf.structured(self.job))


@dataclass(frozen=True)
class MachineFacts:
    """What ``precision=auto`` is decided from."""

    cuda_capability: Optional[tuple[int, int]] = None
    """Compute capability of the GPU; None on a machine without CUDA."""
    gpu_name: Optional[str] = None
    cpu_bf16: Optional[str] = None
    """The CPU feature that computes bf16 natively (``amx_bf16``, ``avx512_bf16``), or None."""


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPU_FLAGS_ENV = "DTRAIN_CPU_FLAGS"
"""Space-separated CPU flags read instead of ``/proc/cpuinfo``'s (``DTRAIN_CPU_FLAGS=amx_bf16`` or ``=none``), so the
suite can take each branch of ``precision=auto`` on any CPU (``make test-precision-branches``)."""


def machine_facts(cpuinfo: Path = Path("/proc/cpuinfo")) -> MachineFacts:
    """This machine's GPU capability and CPU bf16 support (read on rank 0 and broadcast: every rank decides alike)."""
    import torch

    if torch.cuda.is_available():
        return MachineFacts(tuple(torch.cuda.get_device_capability()), torch.cuda.get_device_name())
    flags: set[str] = set()
    if os.environ.get(CPU_FLAGS_ENV) is not None:
        flags = set(os.environ[CPU_FLAGS_ENV].split())
    elif cpuinfo.is_file():  # Linux; elsewhere no flags are known and the CPU computes in fp32
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return MachineFacts(cpu_bf16=next((f for f in CPU_BF16_FLAGS if f in flags), None))


def agreed_machine_facts(dist) -> MachineFacts:
    """Rank 0's machine facts on every rank (a collective): ranks that chose precision=auto differently could not
    train together."""
    from dtrain.dist import broadcast_object

    return broadcast_object(machine_facts() if dist.is_main else None)


def choose_precision(machine: MachineFacts) -> tuple[Precision, str]:
    """``precision=auto``: the fastest precision this machine computes natively, and why.

    Returns:
        ``(precision, reason)``.
    """
    if machine.cuda_capability is not None:
        gpu = f"{machine.gpu_name or 'the GPU'} (compute capability {machine.cuda_capability[0]}.{machine.cuda_capability[1]})"
        if machine.cuda_capability >= (8, 0):
            return Precision.bf16, f"{gpu} computes bf16 natively"
        return Precision.fp16, f"{gpu} has no native bf16: fp16 with dynamic loss scaling"
    if machine.cpu_bf16:
        return Precision.bf16, f"no GPU; the CPU computes bf16 natively ({machine.cpu_bf16})"
    return Precision.fp32, (
        "no GPU, and the CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 matmuls would run many times slower than fp32"
    )


def _resolve_formats(job: JobConfig, formats: dict[str, str]) -> list[str]:
    """Name the detected format of every source read with ``format=auto`` (``job`` is changed in place).

    A slot (``data.format`` for ``data.path``, or a source's own ``format``) is set only when every source it covers
    was detected as one format (``data.eval_path`` under ``data.path`` may differ from the training file: then
    ``auto`` stays).
    """
    detected = {name: DataFormat(fmt.split()[0]) for name, fmt in formats.items()}
    d = job.data
    if d.format != DataFormat.auto or not detected:
        return []
    sources = data_sources(d)
    if not d.sources:
        found = {detected.get(sources[0].name), *([detected.get(EVAL_PATH_SOURCE)] if d.eval_path else [])}
        if len(found) != 1 or None in found:
            return []
        d.format = found.pop()
        return [f"data.format=auto: {d.format.value}, detected from {sources[0].name}'s records (config.yaml records it)"]
    named = []
    for config, source in zip(d.sources, sources):
        if config.format is None and source.name in detected:
            config.format = detected[source.name]
            named.append(f"{source.name}: {config.format.value}")
    return [f"data.format=auto: detected {', '.join(named)} (config.yaml records each source's format)"] if named else []


def resolve_job(
    job: JobConfig,
    train_lengths: Sequence[int],
    world_size: int,
    machine: Optional[MachineFacts] = None,
    resume_layout: Optional[dict] = None,
    formats: Optional[dict[str, str]] = None,
) -> ResolvedJob:
    """Decide what the config leaves open, from the training data, the world size and the machine.

    Args:
        job: The checked job (``dtrain.config.checks.check_job``); not modified.
        train_lengths: Token count of every training example.
        world_size: Ranks in the run.
        machine: Rank 0's machine facts (``machine_facts()``, broadcast); read here when not given.
        resume_layout: The layout of the checkpoint this run resumes (``dtrain.reshard.saved_layout``): on another
            world size, the accumulation steps are recomputed to keep its global batch.
        formats: Each source's record format as preparation read it (``PreparedData.formats``): ``data.format=auto``
            becomes what was detected, so ``config.yaml`` and the resume key name the format that ran (a run
            checkpointed with ``data.format=messages`` resumes under ``auto`` when its records are messages).

    Returns:
        The resolved job and its batch plan.
    """
    job = copy.deepcopy(job)
    decisions = []
    if job.precision.name == Precision.auto:
        job.precision.name, reason = choose_precision(machine or machine_facts())
        decisions.append(f"precision=auto: {job.precision.name.value}, since {reason} (set precision= to choose)")
    decisions += _resolve_formats(job, formats or {})
    if job.data.packing is None:
        job.data.packing, efficiency = choose_packing(train_lengths, job.train.micro_batch_size, job.train.seed)
        decisions.append(
            f"data.packing=null: padded micro-batches in shuffled order would hold {100 * efficiency:.1f}% real tokens, so "
            + ("packing on: a micro-batch is now rows of packed examples" if job.data.packing else "padding")
            + f" (config.yaml records data.packing={str(job.data.packing).lower()}; set it to choose)"
        )
    saved_world = (resume_layout or {}).get("world_size")
    if saved_world and saved_world != world_size:
        data_parallel = world_size // job.parallel.sp_size
        accum = accumulation_for(resume_layout["global_batch_size"], job.train.micro_batch_size, data_parallel)
        if accum != job.train.grad_accum_steps:
            decisions.append(
                f"train.grad_accum_steps={accum} (was {job.train.grad_accum_steps}): the checkpoint was written on {saved_world} "
                f"ranks with a global batch of {resume_layout['global_batch_size']}, kept on {world_size} ranks"
            )
            job.train.grad_accum_steps = accum
    configured = job.wandb.mode
    job.wandb.mode = wandb_mode(configured)
    if configured is None and job.wandb.mode != WandbMode.disabled:
        decisions.append(f"wandb.mode=null: WANDB_MODE in the environment says {job.wandb.mode.value}")
    return ResolvedJob(job, BatchPlan.from_config(job.train, world_size, job.parallel.sp_size), tuple(decisions))

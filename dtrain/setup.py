"""A run's set-up, in the order it happens: check, join the job, load the data, resolve, write the run files.

    deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu     # every rank runs these before the first step

Cheap failures come first: the config is checked before the process group exists, the data (a bad file or
template) before minutes of model loading, and a checkpoint from other settings is refused before the model loads.
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from dtrain.checkpoint import CheckpointManager, FoundCheckpoint, resume_key
from dtrain.config.checks import check_job
from dtrain.config.schema import JobConfig, ReshardMode
from dtrain.data import ChatRenderer, PreparedData, audit_masks, load_or_prepare, mixture_weights, resolve_chat_template
from dtrain.dist import DistInfo, barrier, broadcast_object, init_distributed, on_main_rank, setup_logging
from dtrain.ds_config import write_ds_config
from dtrain.errors import ConfigError
from dtrain.model import load_tokenizer
from dtrain.reshard import convert_to_universal, layout_changes, layout_of, needs_conversion
from dtrain.resolve import ResolvedJob
from dtrain.runlock import claim_run_directory

if TYPE_CHECKING:  # the type only: dtrain.runlock takes the lock
    from dtrain.locks import LockFile

log = logging.getLogger("dtrain")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(job: JobConfig) -> tuple[DistInfo, Path, Optional[LockFile]]:
    """Check the job, join the process group, lock the run directory and start logging (every rank).

    Returns:
        This rank, the run directory, and its lock (held by rank 0 until the job ends; None elsewhere).

    Raises:
        ConfigError: The job cannot run; nothing was started.
        RunDirBusy: Another live job writes into ``output_dir`` (every rank raises; nothing was written).
    """
    # WORLD_SIZE is the launcher's: the process group does not exist yet, and nothing should start for a job that fails.
    check_job(job, cuda_available=torch.cuda.is_available(), world_size=int(os.environ.get("WORLD_SIZE", "1")))
    dist = init_distributed(job.train.dist_timeout_minutes)
    run_dir = Path(job.output_dir).resolve()
    lock = claim_run_directory(run_dir, dist)
    setup_logging(dist, run_dir / "train.log")
    if lock is not None and lock.took_over:
        log.warning("%s", lock.took_over)
    seed_everything(job.train.seed)
    return dist, run_dir, lock


@dataclass
class RunData:
    tokenizer: Any
    renderer: ChatRenderer
    data: PreparedData
    weights: list[float]
    """Each source's mixture weight, by source index."""


def load_renderer(job: JobConfig) -> ChatRenderer:
    """The tokenizer with the run's chat template, and the renderer that masks with it (no model weights)."""
    tokenizer = load_tokenizer(job.model)
    resolve_chat_template(tokenizer, job.data.chat_template)
    return ChatRenderer(tokenizer, job.data.train_on, job.data.end_of_turn_token)


def load_data(job: JobConfig, dist: DistInfo) -> RunData:
    """Tokenizer, chat template and the tokenised data (from the cache, or prepared once per node), mask-audited."""
    renderer = load_renderer(job)
    tokenizer = renderer.tokenizer
    # One token per job, agreed by all ranks: on a shared filesystem one node tokenises, the others wait.
    job_token = broadcast_object(uuid.uuid4().hex if dist.is_main else None)
    data = load_or_prepare(
        job.data,
        renderer,
        job.train.seed,
        job.generate.num_prompts,
        is_local_main=dist.local_rank == 0,
        barrier=barrier,
        job_token=job_token,
    )
    checked = audit_masks(data.train, renderer, job.train.seed)
    log.info("mask audit: %d examples checked (trained tokens, end-of-turn tokens, labels)", checked)
    return RunData(tokenizer, renderer, data, mixture_weights(job.data, data.source_names))


def write_run_files(run: ResolvedJob, ds_config: dict[str, Any], run_dir: Path, dist: DistInfo) -> None:
    """``config.yaml`` (the resolved job: what runs) and ``ds_config.json``, by rank 0."""
    for line in run.decisions:
        log.info("%s", line)
    if dist.is_main:
        (run_dir / "config.yaml").write_text(run.config_yaml())
        write_ds_config(ds_config, run_dir / "ds_config.json")


def checkpoint_manager(run_dir: Path, job: JobConfig, dist: DistInfo, found: Optional[FoundCheckpoint]) -> CheckpointManager:
    """The run's checkpoint manager; ``found`` (the checkpoint to resume) is refused if its settings differ.

    Raises:
        ConfigError: ``found`` was written with another model, data, global batch, seed, precision or LoRA setting.
    """
    key, layout = resume_key(job, dist.world_size), layout_of(job, dist.world_size, dist.nodes)
    ckpt = CheckpointManager(run_dir, job.ckpt, dist, key, job.peft.uses_adapters, layout)
    if found is not None:
        ckpt.check(found)
    return ckpt


def prepare_resume(found: Optional[FoundCheckpoint], job: JobConfig, dist: DistInfo) -> bool:
    """Say what changed since ``found`` was written; convert it to the universal format when its partitions do not
    fit this layout (rank 0, once; every rank waits). Returns whether the engine must load it universally.

    Raises:
        ConfigError: The layout changed and ``ckpt.reshard=never``, or the conversion failed.
    """
    if found is None:
        return False
    changes = layout_changes(found.layout, layout_of(job, dist.world_size, dist.nodes))
    if not changes:
        return False
    described = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(changes.items()))
    if not needs_conversion(changes):
        log.info("resuming %s on another layout with the same ZeRO partitions (%s): an ordinary load, no conversion", found.path, described)
        return False
    if job.ckpt.reshard == ReshardMode.never:
        raise ConfigError(
            f"the checkpoint {found.path} was written on another layout ({described}) and ckpt.reshard=never; "
            "set ckpt.reshard=auto to convert it, or resume on the layout that wrote it"
        )
    log.info("resuming %s on another layout (%s): loading it through DeepSpeed's universal checkpoint format", found.path, described)
    # Sync point: the converted folder is complete before any rank reads it (a long wait on a big model).
    on_main_rank(dist, lambda: convert_to_universal(found.path), ConfigError)
    return True

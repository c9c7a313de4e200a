"""The resolution step: a job's open choices are decided once, before anything is written or loaded.

``data.packing=null`` is decided from the data, batch sizes are derived from ``train.*`` and the world size, and
``wandb.mode=null`` from W&B's environment. Every rank decides alike (same data, config and environment). What
comes out is what runs: ``config.yaml``, ``ds_config.json`` and the checkpoint resume key are all written from
it, so resuming with the values a run actually used (``data.packing=true`` after ``null`` chose packing) works.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Sequence

from omegaconf import OmegaConf

from dtrain.config.batch import BatchPlan
from dtrain.config.schema import JobConfig, WandbMode
from dtrain.data.packing import choose_packing
from dtrain.metrics import wandb_mode

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


def resolve_job(job: JobConfig, train_lengths: Sequence[int], world_size: int) -> ResolvedJob:
    """Decide what the config leaves open, from the training data and the world size.

    Args:
        job: The checked job (``dtrain.config.checks.check_job``); not modified.
        train_lengths: Token count of every training example.
        world_size: Ranks in the run.

    Returns:
        The resolved job and its batch plan.
    """
    job = copy.deepcopy(job)
    decisions = []
    if job.data.packing is None:
        job.data.packing, efficiency = choose_packing(list(train_lengths), job.train.micro_batch_size, job.train.seed)
        decisions.append(
            f"data.packing=null: padded micro-batches in shuffled order would hold {100 * efficiency:.1f}% real tokens, so "
            + ("packing on: a micro-batch is now rows of packed examples" if job.data.packing else "padding")
            + f" (config.yaml records data.packing={str(job.data.packing).lower()}; set it to choose)"
        )
    configured = job.wandb.mode
    job.wandb.mode = wandb_mode(configured)
    if configured is None and job.wandb.mode != WandbMode.disabled:
        decisions.append(f"wandb.mode=null: WANDB_MODE in the environment says {job.wandb.mode.value}")
    return ResolvedJob(job, BatchPlan.from_config(job.train, world_size), tuple(decisions))

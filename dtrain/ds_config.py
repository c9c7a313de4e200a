"""The DeepSpeed JSON, generated from the typed config in one place.

Batch sizes come from :class:`BatchPlan` (the single source of truth), the ZeRO knobs from a stage template
in ``ds_configs/``, everything else from the job config. No Hugging Face ``"auto"`` strings: sizes that HF
would derive at run time (ZeRO-3 bucket sizes) are derived here from the model's hidden size.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from dtrain.config.batch import BatchPlan
from dtrain.config.registry import REPO_ROOT
from dtrain.config.schema import JobConfig, OptimName, Precision
from dtrain.errors import ConfigError

DS_TEMPLATES_DIR = REPO_ROOT / "ds_configs"


BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")


def load_template(name: str) -> dict[str, Any]:
    """Read ``ds_configs/<name>.json`` (or an explicit path to a JSON file)."""
    path = Path(name) if name.endswith(".json") else DS_TEMPLATES_DIR / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in DS_TEMPLATES_DIR.glob("*.json"))
        raise ConfigError(f"zero.template={name!r}: no file {path}; available templates: {available}")
    with path.open() as f:
        return json.load(f)


def build_ds_config(
    job: JobConfig,
    batch: BatchPlan,
    *,
    hidden_size: Optional[int] = None,
    num_parameters: Optional[int] = None,
    cuda_available: bool = False,
) -> dict[str, Any]:
    """Build the DeepSpeed config dict for a job.

    Args:
        job: The validated job config.
        batch: Batch sizes (the one source of truth for all three DeepSpeed batch keys).
        hidden_size: The model's hidden size; sizes ZeRO-3's buckets the way HF's ``"auto"`` would.
        num_parameters: The model's parameter count; no communication bucket is made larger than the model
            (DeepSpeed allocates full buckets up front, which costs a small model seconds and memory for nothing).
        cuda_available: Whether a CUDA device is present (the job was checked by ``dtrain.config.checks``).

    Returns:
        A JSON-serialisable dict for ``deepspeed.initialize(config=...)``.

    Raises:
        ConfigError: A template that is missing or whose stage disagrees with ``zero.stage``.
    """
    zero, train, precision = job.zero, job.train, job.precision
    ds = copy.deepcopy(load_template(zero.template))
    zero_opt = ds.setdefault("zero_optimization", {})
    template_stage = zero_opt.get("stage", zero.stage)
    if template_stage != zero.stage:
        raise ConfigError(f"zero.stage={zero.stage} but template {zero.template!r} is stage {template_stage}")
    zero_opt["stage"] = zero.stage

    ds["train_micro_batch_size_per_gpu"] = batch.micro_batch_size
    ds["gradient_accumulation_steps"] = batch.grad_accum_steps
    ds["train_batch_size"] = batch.global_batch_size
    ds["gradient_clipping"] = train.grad_clip
    if job.parallel.sp_size > 1:
        # DeepSpeed then counts data-parallel ranks as world / sp_size (the batch keys above use that size).
        ds["sequence_parallel_size"] = job.parallel.sp_size

    if job.optim.name == OptimName.adamw_8bit:
        # A client optimizer (bitsandbytes AdamW8bit, built by the trainer): ZeRO accepts it only when told to.
        ds["zero_allow_untested_optimizer"] = True
    else:
        # The optimizer lives in the JSON so DeepSpeed can swap in DeepSpeedCPUAdam when it is offloaded.
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [train.adam_beta1, train.adam_beta2],
                "eps": train.adam_eps,
                "weight_decay": train.weight_decay,
            },
        }

    if "optimizer" in ds and not cuda_available and not zero.offload_optimizer:
        # DeepSpeed's CPU Adam kernels advance beta**step by one multiplication per step, so after a resume
        # (pow(beta, step) from scratch) the bias correction differs in the last bit; torch's AdamW recomputes it
        # every step, which makes a resumed CPU run bit-identical to the straight one.
        ds["optimizer"]["params"]["torch_adam"] = True

    if zero.offload_optimizer:
        zero_opt["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero.offload_params:
        zero_opt["offload_param"] = {"device": "cpu", "pin_memory": True}
    if zero.stage == 3 and job.parallel.sp_size > 1:
        # dtrain.sequence_parallel.gradient_divisor corrects the averaging of this path; the other must not be taken.
        zero_opt["reduce_scatter"] = True
    if zero.stage == 3 and hidden_size:
        zero_opt.setdefault("reduce_bucket_size", hidden_size * hidden_size)
        zero_opt.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        zero_opt.setdefault("stage3_param_persistence_threshold", 10 * hidden_size)

    if num_parameters:
        for key in BUCKET_KEYS:
            if key in zero_opt:
                zero_opt[key] = min(int(zero_opt[key]), num_parameters)

    if precision.name == Precision.fp16:
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": precision.initial_scale_power,
            "loss_scale_window": precision.loss_scale_window,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    elif precision.name == Precision.bf16:
        ds["bf16"] = {"enabled": True}
    return ds


def write_ds_config(ds: dict[str, Any], path: Path) -> None:
    """Write the resolved JSON into the run directory (rank 0 only)."""
    path.write_text(json.dumps(ds, indent=2, sort_keys=True) + "\n")

"""Every cross-field check of a job, in one place, run once before any data or model is loaded.

Types and unknown keys are checked by the schema at compose time; what needs two fields at once, the machine
(CUDA present?) or an optional package (bitsandbytes) is checked here. Each error names the keys and the fix.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from dtrain.config.schema import DataConfig, JobConfig, ModelConfig, ModelInit, OptimName, PeftMethod, Precision
from dtrain.errors import ConfigError, DataError
from dtrain.sequence_parallel import check_attention


def check_job(job: JobConfig, *, cuda_available: bool, world_size: Optional[int] = None) -> None:
    """Refuse a job that cannot run.

    Args:
        job: The composed job.
        cuda_available: Whether this machine has a CUDA device.
        world_size: Ranks of the launch, when known (the launcher's ``WORLD_SIZE``).

    Raises:
        ConfigError: The first problem found, with the fix.
    """
    train, zero = job.train, job.zero
    if train.max_steps is not None and train.max_steps < 1:
        raise ConfigError(f"train.max_steps={train.max_steps}: must be >= 1 (or null to use train.epochs)")
    if train.max_steps is None and train.epochs < 1:
        raise ConfigError(f"train.epochs={train.epochs}: must be >= 1")
    if train.micro_batch_size < 1 or train.grad_accum_steps < 1:
        raise ConfigError(
            f"train.micro_batch_size ({train.micro_batch_size}) and train.grad_accum_steps ({train.grad_accum_steps}) must be >= 1"
        )
    if job.peft.uses_adapters and job.model.init == ModelInit.random:
        raise ConfigError(
            f"peft={job.peft.method.value} with model.init=random would train adapters on random weights that are saved "
            "nowhere, so the adapter could never be reloaded; point model.path at real weights (model.init=pretrained)"
        )
    check_remote_code(job.model)
    if job.precision.name == Precision.fp16 and not cuda_available:
        raise ConfigError(
            "precision=fp16 needs a CUDA GPU (DeepSpeed's fp16 loss scaling does not exist on CPU); "
            "use precision=bf16 (same memory, no loss scaling) or precision=fp32"
        )
    if zero.offload_optimizer and zero.stage < 1:
        raise ConfigError("zero.offload_optimizer=true needs ZeRO stage >= 1")
    if zero.offload_params and zero.stage != 3:
        raise ConfigError("zero.offload_params=true needs ZeRO-3 (zero=zero3_offload); stages 1-2 keep full parameters on every GPU")
    if job.model.activation_offload and not job.model.gradient_checkpointing:
        raise ConfigError(
            "model.activation_offload=true offloads the layer inputs that gradient checkpointing saves: "
            "add model.gradient_checkpointing=true"
        )
    if job.peft.method == PeftMethod.qlora:
        check_qlora(job)
    if job.optim.name == OptimName.adamw_8bit:
        check_adamw_8bit(job)
    check_data_sources(job.data)
    check_sequence_parallel(job, world_size)


def check_data_sources(cfg: DataConfig) -> None:
    """The mixture is well formed, every local source exists and, under ``data.format=auto``, has records of a
    shape dtrain reads (before any tokenizer or model loads).

    Raises:
        ConfigError: A malformed mixture (``data.sources``/``data.path``), field mapping or ``chat_template_kwargs``.
        DataError: A missing file or folder, or a local source whose format cannot be detected, with the source named.
    """
    from dtrain.data.formats import resolve_format
    from dtrain.data.mixture import data_sources
    from dtrain.data.sources import data_files

    sources = data_sources(cfg)
    if cfg.prepared_path and (Path(cfg.prepared_path).expanduser() / "meta.json").is_file():
        return  # training reads the prepared store; the raw files may stay where it was prepared
    for source in sources:
        try:
            if data_files(source.path):  # hub datasets are detected where they are prepared (not loaded on every rank)
                resolve_format(source)
        except DataError as e:
            named = f"data.sources[{source.index}] ({source.name})" if cfg.sources else "data.path"
            raise DataError(f"{named}: {e}") from None
    if cfg.eval_path:
        try:
            data_files(cfg.eval_path)
        except DataError as e:
            raise DataError(f"data.eval_path: {e}") from None


def check_sequence_parallel(job: JobConfig, world_size: Optional[int]) -> None:
    """``parallel.sp_size``: whole groups of ranks and an attention kernel Ulysses can wrap (the model's heads are
    checked once its config is read: ``dtrain.sequence_parallel.check_model``)."""
    sp_size = job.parallel.sp_size
    if sp_size < 1:
        raise ConfigError(f"parallel.sp_size={sp_size}: must be >= 1 (1 = no sequence parallelism)")
    if sp_size == 1:
        return
    if world_size is not None and world_size % sp_size:
        raise ConfigError(
            f"parallel.sp_size={sp_size} with {world_size} ranks: sequence-parallel groups are whole sets of "
            f"{sp_size} ranks; launch a multiple of {sp_size} ranks or change parallel.sp_size"
        )
    check_attention(job.model.attn_implementation, sp_size, "model.attn_implementation")


def check_remote_code(cfg: ModelConfig) -> None:
    """Remote code runs on every rank: only at a pinned revision."""
    if cfg.trust_remote_code and not cfg.revision:
        raise ConfigError(
            "model.trust_remote_code=true runs the model repo's Python on every rank; pin it with model.revision=<commit sha>"
        )


def _require_bitsandbytes(what: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{what} needs bitsandbytes: pip install 'dtrain[qlora]' (or pip install bitsandbytes)")


def check_qlora(job: JobConfig) -> None:
    """Refuse, before any model is loaded, QLoRA set-ups that cannot work."""
    _require_bitsandbytes("peft=qlora")
    if job.zero.offload_params:
        raise ConfigError(
            "peft=qlora with zero.offload_params=true: DeepSpeed cannot offload bitsandbytes' 4-bit weights (their "
            "quantisation state stays on the module); use zero=zero3 (the 4-bit base is partitioned) or zero2_offload"
        )
    if job.peft.quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"peft.quant_type={job.peft.quant_type}: bitsandbytes 4-bit types are nf4 and fp4")


def check_adamw_8bit(job: JobConfig) -> None:
    """8-bit AdamW is a client optimizer: bitsandbytes must import and DeepSpeed must not replace it."""
    _require_bitsandbytes("optim=adamw_8bit")
    if job.zero.offload_optimizer:
        raise ConfigError(
            "optim=adamw_8bit with an offloaded optimizer: DeepSpeed runs its own CPU Adam on offloaded states, so the "
            "8-bit optimizer would not be used; pick zero=zero1/zero2/zero3 (no _offload) or optim=adamw"
        )

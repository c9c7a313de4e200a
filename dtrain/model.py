"""Loading the tokenizer and the model (partitioned under ZeRO-3), choosing attention, attaching LoRA."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Optional

import torch

from dtrain.config.schema import JobConfig, ModelConfig, ModelInit, PeftConfig, PeftMethod, Precision
from dtrain.ds_config import ConfigError

log = logging.getLogger("dtrain")

TORCH_DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16, Precision.fp32: torch.float32}


def _remote_code_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.trust_remote_code and not cfg.revision:
        raise ConfigError(
            "model.trust_remote_code=true runs the model repo's Python on every rank; pin it with model.revision=<commit sha>"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of ``model.path``; a missing pad token becomes the eos token (padding is masked by position)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.path, **_remote_code_kwargs(cfg))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: using eos %r for padding (pad positions are masked by position)", tokenizer.eos_token)
    return tokenizer


def choose_attn_implementation(requested: str) -> tuple[str, str]:
    """Pick the attention kernel and say why.

    Returns:
        ``(implementation, reason)`` where implementation is a transformers ``attn_implementation`` value.
    """
    if requested != "auto":
        return requested, "set by model.attn_implementation"
    if not torch.cuda.is_available():
        return "sdpa", "no CUDA device, so flash-attn cannot run: using torch SDPA"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash-attn is not installed (pip install 'dtrain[flash]'): using torch SDPA"
    return "flash_attention_2", "flash-attn is installed and CUDA is present"


def load_model(job: JobConfig, ds_config: dict[str, Any]):
    """Build or load the causal LM in the training dtype.

    Under ZeRO-3 an ``HfDeepSpeedConfig`` is alive while the model is created, so transformers constructs it
    inside ``deepspeed.zero.Init`` and each rank only ever holds its own partition of the weights.

    Returns:
        ``(model, hf_ds_config)``: keep ``hf_ds_config`` referenced for the life of the model (transformers
        holds it weakly and ZeRO-3 saving/generation consult it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    cfg = job.model
    hf_ds_config = HfDeepSpeedConfig(ds_config) if job.zero.stage == 3 else None
    attn, reason = choose_attn_implementation(cfg.attn_implementation)
    log.info("attention: %s (%s)", attn, reason)
    dtype = TORCH_DTYPES[job.precision.name]
    kwargs = {"dtype": dtype, "attn_implementation": attn, **_remote_code_kwargs(cfg)}
    if cfg.init == ModelInit.random:
        config = AutoConfig.from_pretrained(cfg.path, **_remote_code_kwargs(cfg))
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        log.info("model: %s built from its config with random weights (model.init=random)", cfg.path)
    else:
        # Pickled .bin weights can execute code when loaded: only safetensors unless the config says otherwise.
        model = AutoModelForCausalLM.from_pretrained(cfg.path, use_safetensors=None if cfg.allow_pickle_weights else True, **kwargs)
        log.info("model: %s loaded (%s)", cfg.path, dtype)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        log.info("gradient checkpointing: on")
    return model, hf_ds_config


def load_exported(folder, base_path: Optional[str], is_peft: bool, dtype: torch.dtype):
    """Load an exported ``final/`` folder the way a user would: plain transformers, or the base model + peft adapter.

    Safe to call on one rank of a ZeRO-3 job: the job's ``HfDeepSpeedConfig`` is switched off meanwhile, or
    transformers would build the model inside ``zero.Init``, a collective the other ranks never join.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    job_ds_config = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        if not is_peft:
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, use_safetensors=True)
        return PeftModel.from_pretrained(base, folder)
    finally:
        if job_ds_config is not None:
            hf_deepspeed.set_hf_deepspeed_config(job_ds_config)


def count_parameters_from_config(config) -> int:
    """Exact parameter count of the model a config describes, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def linear_target_modules(model) -> list[str]:
    """Names (last component) of every linear layer except the output head, found from the model itself."""
    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_lora(model, cfg: PeftConfig):
    """Wrap the model with LoRA adapters (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules or linear_target_modules(model)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM")
    log.info("LoRA r=%d alpha=%d dropout=%g on %s", cfg.r, cfg.alpha, cfg.dropout, targets)
    return get_peft_model(model, lora)


def parameter_counts(model) -> tuple[int, int]:
    """``(trainable, total)`` parameters, also when ZeRO-3 has partitioned them (``ds_numel``)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def build_model(job: JobConfig, ds_config: dict[str, Any]) -> tuple[Any, Optional[Any]]:
    """Load the model, attach LoRA when configured, and log trainable vs total parameters."""
    model, hf_ds_config = load_model(job, ds_config)
    if job.peft.method == PeftMethod.lora:
        model = apply_lora(model, job.peft)
    trainable, total = parameter_counts(model)
    if job.zero.stage == 3:
        local = sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))
        log.info("ZeRO-3: weights partitioned while loading; this rank holds %s of %s parameters", f"{local:,}", f"{total:,}")
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1))
    return model, hf_ds_config

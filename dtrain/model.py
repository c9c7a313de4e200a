"""Loading the tokenizer and the model (partitioned under ZeRO-3), choosing attention, attaching LoRA."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Optional

import torch

from dtrain.architectures import (
    LoraTargets,
    causal_lm_class,
    lora_targets,
    mark_moe_blocks_as_zero3_leaves,
    model_shape,
    supports_attention,
)
from dtrain.config.checks import check_remote_code
from dtrain.config.schema import JobConfig, ModelConfig, ModelInit, PeftConfig, PeftMethod, Precision
from dtrain.init_weights import init_weights_by_name
from dtrain.sequence_parallel import register_ulysses

log = logging.getLogger("dtrain")

TORCH_DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16, Precision.fp32: torch.float32}


def _remote_code_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    check_remote_code(cfg)
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


LONG_SEQUENCE_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of ``model.path``; a missing pad token becomes the eos token (padding is masked by position)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.path, **_remote_code_kwargs(cfg))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: using eos %r for padding (pad positions are masked by position)", tokenizer.eos_token)
    # What is trained is decided (and reported) by data.max_seq_len and data.truncation; the tokenizer's warning that a
    # conversation is longer than its model_max_length says nothing about that. Marked as given; nothing is saved.
    tokenizer.deprecation_warnings[LONG_SEQUENCE_WARNING] = True
    return tokenizer


def choose_attn_implementation(requested: str, model_class: Optional[type] = None) -> tuple[str, str]:
    """Pick the attention kernel and say why.

    Args:
        requested: ``model.attn_implementation`` (``auto`` or a transformers value, kept as given).
        model_class: The causal-LM class; with ``auto``, a kernel it does not implement (Gemma-2 has no SDPA
            path) falls back to the next one: flash-attn, then SDPA, then eager.

    Returns:
        ``(implementation, reason)`` where implementation is a transformers ``attn_implementation`` value.
    """
    if requested != "auto":
        return requested, "set by model.attn_implementation"
    if not torch.cuda.is_available():
        choice, reason = "sdpa", "no CUDA device, so flash-attn cannot run: using torch SDPA"
    elif importlib.util.find_spec("flash_attn") is None:
        choice, reason = "sdpa", "flash-attn is not installed (pip install 'dtrain[flash]'): using torch SDPA"
    else:
        choice, reason = "flash_attention_2", "flash-attn is installed and CUDA is present"
    order = ("flash_attention_2", "sdpa", "eager")
    usable = next(c for c in order[order.index(choice) :] if model_class is None or supports_attention(model_class, c))
    if usable != choice:
        reason = f"{model_class.__name__} has no {choice} attention in transformers, so {usable} ({reason})"
    return usable, reason


def load_model(job: JobConfig, ds_config: dict[str, Any]):
    """Build or load the causal LM in the training dtype.

    Under ZeRO-3 an ``HfDeepSpeedConfig`` is alive while the model is created, so transformers constructs it
    inside ``deepspeed.zero.Init`` and each rank only ever holds its own partition of the weights.

    With ``parallel.sp_size`` > 1, Ulysses attention is registered with transformers first (the model looks its
    attention kernel up by name when it is built).

    Returns:
        ``(model, hf_ds_config, mpu)``: keep ``hf_ds_config`` referenced for the life of the model (transformers
        holds it weakly and ZeRO-3 saving/generation consult it); ``mpu`` is DeepSpeed's sequence-parallel groups
        for ``deepspeed.initialize`` (None without sequence parallelism).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    cfg = job.model
    hf_ds_config = HfDeepSpeedConfig(ds_config) if job.zero.stage == 3 else None
    config = AutoConfig.from_pretrained(cfg.path, **_remote_code_kwargs(cfg))
    attn, reason = choose_attn_implementation(cfg.attn_implementation, causal_lm_class(config))
    log.info("attention: %s (%s)", attn, reason)
    mpu = register_ulysses(job, config, attn)
    dtype = TORCH_DTYPES[job.precision.name]
    kwargs = {"dtype": dtype, "attn_implementation": attn, **_remote_code_kwargs(cfg)}
    if job.peft.method == PeftMethod.qlora:
        kwargs["quantization_config"] = quantization_config(job.peft, dtype)
    if cfg.init == ModelInit.random:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        init_weights_by_name(model, job.train.seed, zero3=job.zero.stage == 3, rank=rank)
        log.info(
            "model: %s built from its config with random weights (model.init=random, drawn per module from "
            "train.seed=%d: the same model under every ZeRO stage and world size)",
            cfg.path,
            job.train.seed,
        )
    else:
        # Pickled .bin weights can execute code when loaded: only safetensors unless the config says otherwise.
        model = AutoModelForCausalLM.from_pretrained(cfg.path, use_safetensors=None if cfg.allow_pickle_weights else True, **kwargs)
        log.info("model: %s loaded (%s)", cfg.path, dtype)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        log.info("gradient checkpointing: on")
    return model, hf_ds_config, mpu


def load_exported(folder, base_path: Optional[str], is_peft: bool, dtype: torch.dtype, quantization=None):
    """Load an exported ``final/`` folder the way a user would: plain transformers, or the base model + peft adapter.

    ``quantization`` (QLoRA) quantises the base afresh while loading, as the run did.

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

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, use_safetensors=True, quantization_config=quantization)
        if quantization is not None:
            keep_standard_4bit_layout(base)
        return PeftModel.from_pretrained(base, folder)
    finally:
        if job_ds_config is not None:
            hf_deepspeed.set_hf_deepspeed_config(job_ds_config)


def quantization_config(cfg: PeftConfig, dtype: torch.dtype):
    """4-bit base for QLoRA: NF4 (or FP4), optional double quantisation, compute in the training dtype.

    The packed 4-bit weights are stored in the training dtype too (``bnb_4bit_quant_storage``): DeepSpeed casts
    and ZeRO-3 partitions parameters by dtype, and a uint8 storage would be neither.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def footprint_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as stored (4-bit weights count packed), across ZeRO-3 partitions."""
    total = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def keep_standard_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU-only layout (no effect on GPUs).

    On CPUs with AVX512-BF16 it repacks a weight in place the first time the layer runs in eval mode. Under
    ZeRO-3 that rewrites a gathered, partitioned parameter; and saving, ``dequantize()`` and merging then read
    the repacked bytes as standard NF4 (wrong weights). Keep the standard layout everywhere.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def prepare_for_kbit_training(model, gradient_checkpointing: bool) -> None:
    """Freeze the quantised base; with gradient checkpointing, make the embeddings' output require grad.

    peft's ``prepare_model_for_kbit_training`` also upcasts norms and the head to fp32; under DeepSpeed that
    upcast would not survive (the engine casts every parameter to the training dtype), so it is not done: the
    frozen norms run in the training dtype and the trained LoRA weights keep FP32 master copies in the optimizer.
    """
    for param in model.parameters():
        param.requires_grad = False
    keep_standard_4bit_layout(model)
    if gradient_checkpointing:
        # Checkpointed blocks recompute from their inputs; with every base weight frozen those inputs must carry
        # grad or no gradient reaches the adapters.
        model.enable_input_require_grads()


def count_parameters_from_config(config) -> int:
    """Exact parameter count of the model a config describes, built on the meta device (no memory, no weights)."""
    return model_shape(config).num_parameters


def apply_lora(model, cfg: PeftConfig):
    """Wrap the model with LoRA adapters (peft); the base weights are frozen.

    ``peft.target_modules`` unset: every linear layer but the head, and the fused expert weights of a mixture of
    experts (``dtrain.architectures.lora_targets``); the router stays frozen. The log names what is adapted.
    """
    from peft import LoraConfig, get_peft_model

    targets = LoraTargets(list(cfg.target_modules), [], []) if cfg.target_modules else lora_targets(model)
    dropout = cfg.dropout
    if targets.parameters and dropout > 0:
        # peft's adapters on fused parameters (ParamWrapper) refuse dropout, and one LoraConfig has one dropout.
        log.warning("peft.dropout=%g set to 0: peft cannot apply dropout to the LoRA of fused expert weights", dropout)
        dropout = 0.0
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=dropout,
        target_modules=targets.modules,
        target_parameters=targets.parameters or None,
        task_type="CAUSAL_LM",
    )
    log.info(
        "LoRA r=%d alpha=%d dropout=%g on %s%s%s",
        cfg.r,
        cfg.alpha,
        dropout,
        targets.modules,
        f", and the fused expert weights {targets.parameters}" if targets.parameters else "",
        f"; frozen without an adapter: the routers {targets.frozen}" if targets.frozen else "",
    )
    return get_peft_model(model, lora)


def _log_quantisation(model, job: JobConfig, num_parameters: int) -> None:
    import bitsandbytes as bnb

    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    after = footprint_bytes(model)
    before = num_parameters * TORCH_DTYPES[job.precision.name].itemsize
    log.info(
        "QLoRA: %d linear layers quantised to 4-bit %s%s (e.g. %s)",
        len(quantised),
        job.peft.quant_type,
        " with double quantisation" if job.peft.double_quant else "",
        ", ".join(quantised[:3]),
    )
    log.info(
        "base model footprint: %.2f MiB in %s before quantisation -> %.2f MiB after (%.2fx smaller)",
        before / 2**20,
        job.precision.name.value,
        after / 2**20,
        before / max(after, 1),
    )


def parameter_counts(model) -> tuple[int, int]:
    """``(trainable, total)`` parameters, also when ZeRO-3 has partitioned them (``ds_numel``) or bitsandbytes
    packed them into 4 bits (counted unpacked, as peft's ``get_nb_trainable_parameters`` does)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        if p.__class__.__name__ == "Params4bit":  # two 4-bit weights per byte of its storage dtype
            n *= 2 * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def build_model(job: JobConfig, ds_config: dict[str, Any], num_parameters: int) -> tuple[Any, Optional[Any], Optional[Any]]:
    """Load the model, attach LoRA when configured, and log trainable vs total parameters (``load_model``'s triple).

    Args:
        num_parameters: The unquantised parameter count (from the config), for the QLoRA footprint report.
    """
    model, hf_ds_config, mpu = load_model(job, ds_config)
    if job.peft.method == PeftMethod.qlora:
        _log_quantisation(model, job, num_parameters)
        prepare_for_kbit_training(model, job.model.gradient_checkpointing)
    if job.zero.stage == 3:
        leaves = mark_moe_blocks_as_zero3_leaves(model)
        if leaves:
            log.info("ZeRO-3: %s gathered whole (every rank joins each gather, whatever experts its tokens route to)", leaves)
    if job.peft.uses_adapters:
        model = apply_lora(model, job.peft)
    trainable, total = parameter_counts(model)
    if job.zero.stage == 3 and job.peft.method == PeftMethod.qlora:
        # transformers never loads a quantised model inside zero.Init; the engine partitions it at start-up.
        log.info("ZeRO-3: the 4-bit base was loaded whole on every rank; DeepSpeed partitions it when the engine starts")
    elif job.zero.stage == 3:
        local = sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))
        log.info("ZeRO-3: weights partitioned while loading; this rank holds %s of %s parameters", f"{local:,}", f"{total:,}")
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1))
    # from_pretrained returns the model in eval mode, and nothing else sets train mode before the first eval: LoRA
    # dropout, gradient checkpointing (transformers checkpoints only in training) and the sequence-parallel attention
    # (eval mode runs whole sequences) were all off for a pretrained model until then.
    model.train()
    return model, hf_ds_config, mpu

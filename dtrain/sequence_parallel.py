"""Ulysses sequence parallelism (DeepSpeed's ALST): groups of ``parallel.sp_size`` ranks split every sequence.

    deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu parallel.sp_size=2

The loader cuts each row into ``sp_size`` pieces along the sequence (after the causal shift, see
``dtrain/data/loader.py``); inside each attention layer DeepSpeed's all-to-all trades the sequence split for a split of
the heads, so every head attends over the whole sequence, and trades back after. Everything outside attention runs on
the rank's piece only. The groups are consecutive ranks, as DeepSpeed's ``parallel_state_sp`` builds them, and the
ranks of a group train the examples of one data-parallel rank.

What is DeepSpeed's here: ``UlyssesSPAttentionHF.register_with_transformers`` (the all-to-all attention, installed in
transformers' attention table before the model loads) and the ``mpu`` it returns (the groups, handed to
``deepspeed.initialize``). What dtrain adds around it:

* sdpa on packed rows and sliding windows: DeepSpeed drops the model's mask and relies on ``is_causal``, under which
  packed examples would attend to each other and a sliding window would be lost; the sdpa it wraps here builds the
  block-diagonal (windowed) causal mask from the gathered ``position_ids`` instead (flash-attn finds the examples
  from them and takes the window itself).
* eval, the export probe and generation (the module in eval mode) run whole sequences on every rank through the plain
  attention, with the model's own mask: DeepSpeed's ``disable_in_eval`` would still drop the padding mask.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from dtrain.config.schema import JobConfig
from dtrain.errors import ConfigError

log = logging.getLogger("dtrain")

ULYSSES_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")
"""Attention kernels Ulysses wraps with packed rows kept apart: sdpa through ``_sdpa_by_documents`` (tested on CPU),
flash-attn through transformers' own varlen path from the gathered ``position_ids`` (needs a GPU to test)."""


def check_attention(implementation: str, sp_size: int, what: str) -> None:
    """Refuse an attention kernel Ulysses cannot wrap exactly.

    Args:
        implementation: A transformers ``attn_implementation`` value (after ``auto`` was decided, or as configured).
        sp_size: ``parallel.sp_size``.
        what: Where the value came from, for the message.

    Raises:
        ConfigError: ``implementation`` is not one of ``ULYSSES_ATTENTION``.
    """
    if sp_size == 1 or implementation in ULYSSES_ATTENTION + ("auto",):
        return
    why = {
        "eager": "eager attention needs the full 4-D mask, which DeepSpeed's Ulysses wrapper drops (it would be "
        "sequence x sequence per layer)",
        "flex_attention": "DeepSpeed rebuilds flex_attention's BlockMask after the all-to-all as a plain causal mask, "
        "so packed examples would attend to each other",
    }.get(implementation, "dtrain does not check it under sequence parallelism")
    raise ConfigError(
        f"parallel.sp_size={sp_size} with attention {implementation!r} ({what}): {why}; use "
        f"model.attn_implementation=sdpa or flash_attention_2 (or parallel.sp_size=1)"
    )


def check_model(config: Any, sp_size: int, attn_implementation: str) -> None:
    """Refuse, from the model's ``config.json``, a model whose attention cannot be split over ``sp_size`` ranks.

    Ulysses gives each rank ``heads / sp_size`` query heads of the whole sequence; key/value heads are split the same
    way, or repeated when there are fewer of them than ranks (``sp_size`` a multiple of them).

    Raises:
        ConfigError: Heads that do not split, or an attention kernel that cannot be wrapped.
    """
    if sp_size == 1:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % sp_size:
        raise ConfigError(
            f"parallel.sp_size={sp_size}: the model has {heads} attention heads, which do not split evenly over "
            f"{sp_size} ranks (Ulysses gives each rank heads / sp_size of them); pick a divisor of {heads}"
        )
    if kv_heads % sp_size and sp_size % kv_heads:
        raise ConfigError(
            f"parallel.sp_size={sp_size}: the model has {kv_heads} key/value heads; Ulysses needs them to split evenly "
            f"over the ranks or the ranks to be a multiple of them (each head then repeated); pick a divisor of {kv_heads} "
            f"or a multiple of it that divides {heads}"
        )
    check_attention(attn_implementation, sp_size, "chosen for this model")


def register_ulysses(job: JobConfig, config: Any, attn_implementation: str) -> Optional[Any]:
    """Install Ulysses attention in transformers and build the groups; call before the model is loaded.

    Args:
        job: The resolved job (``parallel.sp_size``, ``train.micro_batch_size``).
        config: The model's transformers config.
        attn_implementation: The kernel the model will load with (``dtrain.model.choose_attn_implementation``).

    Returns:
        DeepSpeed's ``mpu`` (for ``deepspeed.initialize``), or None when ``parallel.sp_size`` is 1.
    """
    sp_size = job.parallel.sp_size
    if sp_size == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    check_model(config, sp_size, attn_implementation)
    plain = ALL_ATTENTION_FUNCTIONS[attn_implementation]
    if attn_implementation == "sdpa":
        # Installed first so that DeepSpeed, which looks the kernel up by name, wraps this one.
        ALL_ATTENTION_FUNCTIONS[attn_implementation] = _sdpa_by_documents(plain)
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=_Loaded(config),
        core_attn_implementation=attn_implementation,
        sequence_parallel_size=sp_size,
        micro_batch_size=job.train.micro_batch_size,
        seq_length_is_variable=True,
    )
    ulysses = ALL_ATTENTION_FUNCTIONS[attn_implementation]

    def attention(module: torch.nn.Module, *args, **kwargs):
        # In eval mode (eval loss, export probe, generation) each rank holds whole sequences: no all-to-all, and the
        # model's own mask (padding, left-padded prompts) is kept.
        return (ulysses if module.training else plain)(module, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[attn_implementation] = attention
    log.info(
        "sequence parallelism: Ulysses over groups of %d consecutive ranks (%s attention); each rank holds 1/%d of "
        "every sequence, and all-to-alls split the heads inside attention",
        sp_size,
        attn_implementation,
        sp_size,
    )
    return mpu


def gradient_divisor(zero_stage: int, world_size: int, sp_size: int) -> int:
    """What DeepSpeed divides the gradients, summed over all ranks, by: the data-parallel size (world / sp_size).

    Except under ZeRO-3 with sequence parallelism: DeepSpeed 0.19.8's ZeRO-3 reduce-scatter
    (``reduce_scatter_coalesced``, taken by ``__avg_scatter_grads`` whenever ``reduce_scatter`` is on) divides by the
    whole partition group, the sequence-parallel peers included, while its contiguous all-reduce path and ZeRO-1/2
    divide by ``world / sp_size``. Gradients and their norm came out ``sp_size`` times too small (measured: grad norm
    exactly half at sp_size=2); the trainer scales the loss by this divisor instead, and ``dtrain/ds_config.py`` pins
    ``reduce_scatter`` on so that every bucket takes that path.
    """
    if zero_stage == 3 and sp_size > 1:
        return world_size
    return world_size // sp_size


class _Loaded:
    """The config as DeepSpeed's registration accepts a loaded model's: it then reads no file (remote code, offline)."""

    def __init__(self, config: Any):
        self.config = config


def document_causal_mask(position_ids: torch.Tensor, sliding_window: Optional[int] = None) -> Optional[torch.Tensor]:
    """``[batch, 1, seq, seq]`` boolean mask (True = attend) that keeps each packed example to itself, or None.

    An example starts wherever ``position_ids`` do not continue by one (they restart at 0 for every packed example),
    as transformers finds packed examples. With ``sliding_window`` a query also sees only the last ``sliding_window``
    keys (itself included), as transformers' ``sliding_window_overlay`` does.

    Returns:
        None when every row is one run of positions and no window applies: plain causal attention is then exact.
    """
    seq = position_ids.size(1)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    windowed = sliding_window is not None and sliding_window < seq
    if not windowed and not starts[:, 1:].any():
        return None
    document = starts.cumsum(dim=1)
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    if windowed:
        allowed = allowed.triu(diagonal=1 - sliding_window)
    return ((document[:, :, None] == document[:, None, :]) & allowed).unsqueeze(1)


def _sdpa_by_documents(sdpa: Callable) -> Callable:
    """transformers' sdpa kernel, given the block-diagonal causal mask of packed rows (and the layer's sliding window)
    when no mask is passed: DeepSpeed's Ulysses wrapper drops the model's mask, which was built for one piece."""

    def attention(module, query, key, value, attention_mask, *args, position_ids=None, **kwargs):
        if attention_mask is None and position_ids is not None:
            attention_mask = document_causal_mask(position_ids, kwargs.get("sliding_window"))
        return sdpa(module, query, key, value, attention_mask, *args, position_ids=position_ids, **kwargs)

    return attention

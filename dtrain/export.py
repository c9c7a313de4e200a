"""Writing the trained model as plain Hugging Face / peft folders, gathering ZeRO-3 partitions first."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dtrain.dist import DistInfo, barrier

log = logging.getLogger("dtrain")


def gather_parameters(model, dist: DistInfo, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) copies of the model's parameters and persistent buffers, on rank 0's CPU.

    Collective under ZeRO-3: every rank must call it. Parameters are gathered one at a time so no rank holds
    more than one full parameter beyond its own partition. Other ranks get an empty dict.
    """
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # partitioned by ZeRO-3: gather, read on rank 0, re-partition
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if dist.is_main:
                    state[name] = param.detach().cpu().clone()
        elif dist.is_main:
            state[name] = param.detach().cpu().clone()
    if not trainable_only and dist.is_main:
        persistent = model.state_dict().keys()
        for name, buf in model.named_buffers():
            if name in persistent:
                state[name] = buf.detach().cpu().clone()
    return state


def save_model(model, tokenizer, out_dir: Path, dist: DistInfo, is_peft: bool) -> None:
    """Write ``out_dir`` so it loads with plain ``transformers`` (full) or ``peft`` (adapter) plus the tokenizer.

    Full fine-tuning writes safetensors + config + generation config; LoRA writes only the adapter. Both write
    the tokenizer with its chat template. Collective: every rank calls it; only rank 0 writes.
    """
    state = gather_parameters(model, dist, trainable_only=is_peft)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if is_peft:
            if not state:
                raise RuntimeError("LoRA export gathered no trainable tensors; refusing to write an empty adapter")
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        else:
            model.config.use_cache = True  # for users of the exported model; training turned it off
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            model.config.use_cache = False
        tokenizer.save_pretrained(out_dir)
        log.info("saved %s to %s", "LoRA adapter + tokenizer" if is_peft else "model + tokenizer", out_dir)
    barrier()  # nobody reads the folder (or exits) before rank 0 has finished writing it

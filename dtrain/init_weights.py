"""Seeded random weights that do not depend on the layout: the same seed gives the same model under any ZeRO stage.

    deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu zero=zero3      # model.init=random: the same model as zero2

``from_config`` draws every weight from the global RNG in construction order. Under ZeRO-3 the model is built inside
``deepspeed.zero.Init``, which partitions each module as it is made and initialises the partitions its own way, so
the same seed gave a different model (one epoch at lr=0: loss 6.2249 under ZeRO-3 against 5.8341 under ZeRO-1/2).
Here each module is initialised again by its model's own ``_init_weights``, from an RNG seeded by the run's seed and
the module's name: what a module draws depends on nothing else, neither the stage, nor the world size, nor the order.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import nullcontext

import torch
from torch import nn


def module_seed(seed: int, name: str) -> int:
    """The RNG seed of module ``name`` (a qualified name, e.g. ``model.layers.0.mlp.up_proj``)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _owned_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """``(name, module, owner)``: ``owner`` is the nearest ``PreTrainedModel`` around it, whose ``_init_weights``
    knows the module (composite models dispatch per sub-model, as transformers does)."""
    from transformers import PreTrainedModel

    def walk(prefix: str, module: nn.Module, owner: nn.Module):
        owner = module if isinstance(module, PreTrainedModel) else owner
        for child_name, child in module.named_children():
            yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child, owner)
        yield prefix, module, owner

    yield from walk("", model, model)


@torch.no_grad()
def init_weights_by_name(model: nn.Module, seed: int, zero3: bool, rank: int) -> int:
    """Re-initialise every module's own parameters from ``module_seed(seed, name)`` (every rank calls it).

    Under ZeRO-3 each module's partitions are gathered, rank 0 initialises them and DeepSpeed partitions the result
    again; elsewhere every rank draws the same values itself. Weights shared by two modules (tied embeddings) are
    drawn once, by the first module that holds them.

    Returns:
        How many parameters were initialised.
    """
    import deepspeed

    seen: set[int] = set()
    count = 0
    for name, module, owner in _owned_modules(model):
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for p in params)
        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if zero3 else nullcontext()
        with gathered:
            if zero3 and rank != 0:
                continue  # rank 0's values are broadcast when the gather closes
            for p in params:
                p._is_hf_initialized = False  # transformers' init functions skip tensors marked as initialised
            devices = [p.device for p in params if p.device.type == "cuda"]
            with torch.random.fork_rng(devices=devices[:1]):
                torch.manual_seed(module_seed(seed, name))
                owner._init_weights(module)
        count += sum(p.numel() if not hasattr(p, "ds_numel") else p.ds_numel for p in params)
    return count

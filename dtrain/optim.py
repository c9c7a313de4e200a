"""Parameter groups and the learning-rate schedule (warmup, then cosine / linear decay or constant)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from dtrain.config.schema import OptimConfig, OptimName, Schedule, TrainConfig


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters, with no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitions parameters into flat 1-D shards: the original rank is in ds_shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_client_optimizer(groups: list[dict], train: TrainConfig, optim: OptimConfig) -> Optional[torch.optim.Optimizer]:
    """The optimizer dtrain builds itself (None: DeepSpeed builds AdamW from the JSON)."""
    if optim.name != OptimName.adamw_8bit:
        return None
    import bitsandbytes as bnb

    # Block-wise 8-bit m and v (2 bytes per parameter + one fp32 scale per 256 values) instead of 8 bytes.
    return bnb.optim.AdamW8bit(
        groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps, weight_decay=train.weight_decay
    )


def lr_multiplier(train: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``train.lr`` for optimizer step ``s`` (0-based): the first step already has a non-zero lr."""
    warmup = int(round(train.warmup_ratio * total_steps))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if train.schedule == Schedule.constant:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        floor = train.min_lr_ratio
        if train.schedule == Schedule.cosine:
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * (1.0 - progress)

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(train, total_steps))

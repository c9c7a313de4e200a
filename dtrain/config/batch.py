"""The batch plan: examples per optimizer step, derived once from ``train.*`` and the world size.

Everything that needs a batch size (the sampler, the DeepSpeed JSON, the loss normaliser, the planner) reads it
from here, so the three DeepSpeed batch keys can never disagree with what the loop does.
"""

from __future__ import annotations

from dataclasses import dataclass

from dtrain.config.schema import TrainConfig
from dtrain.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """Examples per optimizer step: ``micro_batch_size x grad_accum_steps x world_size``."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int

    @classmethod
    def from_config(cls, train: TrainConfig, world_size: int) -> BatchPlan:
        if train.micro_batch_size < 1 or train.grad_accum_steps < 1 or world_size < 1:
            raise ConfigError(
                f"train.micro_batch_size ({train.micro_batch_size}), train.grad_accum_steps "
                f"({train.grad_accum_steps}) and the world size ({world_size}) must all be >= 1"
            )
        return cls(train.micro_batch_size, train.grad_accum_steps, world_size)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

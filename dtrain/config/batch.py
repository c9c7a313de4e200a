"""The batch plan: examples per optimizer step, derived once from ``train.*``, the world size and ``parallel.sp_size``.

Everything that needs a batch size (the sampler, the DeepSpeed JSON, the loss normaliser, the planner) reads it
from here, so the three DeepSpeed batch keys can never disagree with what the loop does.
"""

from __future__ import annotations

from dataclasses import dataclass

from dtrain.config.schema import TrainConfig
from dtrain.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """Examples per optimizer step: ``micro_batch_size x grad_accum_steps x data_parallel_size``; with sequence
    parallelism each row is cut into ``sp_size`` pieces, one per rank of a group."""

    micro_batch_size: int
    grad_accum_steps: int
    data_parallel_size: int
    """Ranks that draw different examples: the world size, or the number of sequence-parallel groups (the ranks of
    one group train the same examples, each on a piece of every sequence)."""
    sp_size: int = 1
    """Ranks per sequence-parallel group (``parallel.sp_size``)."""

    @classmethod
    def from_config(cls, train: TrainConfig, world_size: int, sp_size: int = 1) -> BatchPlan:
        if train.micro_batch_size < 1 or train.grad_accum_steps < 1 or world_size < 1:
            raise ConfigError(
                f"train.micro_batch_size ({train.micro_batch_size}), train.grad_accum_steps "
                f"({train.grad_accum_steps}) and the world size ({world_size}) must all be >= 1"
            )
        if sp_size < 1 or world_size % sp_size:
            raise ConfigError(
                f"parallel.sp_size={sp_size} does not divide the world size {world_size}: sequence-parallel groups are "
                "whole sets of ranks; launch a multiple of parallel.sp_size ranks"
            )
        return cls(train.micro_batch_size, train.grad_accum_steps, world_size // sp_size, sp_size)

    def place(self, rank: int) -> tuple[int, int]:
        """``(data-parallel rank, place in its sequence-parallel group)`` of a rank. The groups are consecutive
        ranks, as DeepSpeed's ``parallel_state_sp`` builds them."""
        return divmod(rank, self.sp_size)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.data_parallel_size

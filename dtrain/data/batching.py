"""Which examples each rank sees at each step, and how they become padded tensors."""

from __future__ import annotations

import random
from typing import Iterator, Optional

import numpy as np
import torch

from dtrain.config.batch import BatchPlan
from dtrain.config.schema import LengthGrouping
from dtrain.data.chat import IGNORE_INDEX, TokenizedExample

LENGTH_GROUP_BATCHES = 64


class StepSampler:
    """Deterministic per-epoch shuffle; each optimizer step takes the next ``global_batch_size`` examples.

    The examples of a step do not depend on how they are split into micro-batches and ranks, so a run with
    (micro 4, accum 1, 1 rank) sees the same data per step as one with (micro 1, accum 2, 2 ranks). Every rank
    gets the same number of micro-batches (an epoch's tail that does not fill a global batch waits for the next
    epoch's shuffle), so no rank ever waits in a collective that another rank skips.
    """

    def __init__(
        self,
        num_examples: int,
        batch: BatchPlan,
        rank: int,
        seed: int,
        lengths: Optional[list[int]] = None,
        grouping: LengthGrouping = LengthGrouping.none,
    ):
        """
        Args:
            num_examples: Units to sample from (examples, or packed rows).
            batch: The batch plan (micro x accumulation x ranks).
            rank: This rank.
            seed: Base seed; epoch ``e`` shuffles with a seed derived from ``(seed, e)``.
            lengths: Token count of each unit; needed by any grouping but ``none``.
            grouping: ``within_step`` sorts each step's units by length before splitting them (same units per
                step); ``across_steps`` also sorts within shuffled mega-batches of 64 steps, then shuffles the steps.
        """
        if grouping != LengthGrouping.none and lengths is None:
            raise ValueError(f"grouping={grouping.value} needs the units' lengths")
        self.num_examples = num_examples
        self.batch = batch
        self.rank = rank
        self.seed = seed
        self.lengths = lengths
        self.grouping = grouping
        self._cached: Optional[tuple[int, list[int]]] = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch.global_batch_size

    @property
    def unused_per_epoch(self) -> int:
        return self.num_examples - self.steps_per_epoch * self.batch.global_batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        """All ranks' units of the epoch, step after step (each step's slice in micro-batch order)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(self.num_examples))
        rng.shuffle(order)
        size = self.batch.global_batch_size
        used = self.steps_per_epoch * size
        if self.grouping == LengthGrouping.across_steps:
            mega = size * LENGTH_GROUP_BATCHES
            grouped = []
            for start in range(0, len(order), mega):
                grouped += sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            batches = [grouped[i : i + size] for i in range(0, used, size)]
            rng.shuffle(batches)
            order = [i for b in batches for i in b] + grouped[used:]
        if self.grouping != LengthGrouping.none and used:
            # Longest first within each step: a rank's micro-batches, and the ranks at each micro-batch, get
            # similar lengths. Stable, so equal lengths keep the shuffled order (numpy: a million units in a second).
            steps = np.asarray(order[:used], dtype=np.int64).reshape(-1, size)
            by_length = np.argsort(-np.asarray(self.lengths)[steps], axis=1, kind="stable")
            order = np.take_along_axis(steps, by_length, axis=1).ravel().tolist() + order[used:]
        self._cached = (epoch, order)  # the loader's plan and its first epoch's steps share one order
        return order

    def steps(self, epoch: int, start_step: int = 0) -> Iterator[list[list[int]]]:
        """Yield, per optimizer step, this rank's ``grad_accum_steps`` micro-batches of example indices.

        The position is ``(epoch, step within the epoch)``: the order is a pure function of the seed and the
        epoch, so a resumed run passes ``start_step`` and sees exactly the batches it would have seen.
        """
        order = self.epoch_order(epoch)
        micro, accum, world = self.batch.micro_batch_size, self.batch.grad_accum_steps, self.batch.data_parallel_size
        for step in range(start_step, self.steps_per_epoch):
            chunk = order[step * self.batch.global_batch_size : (step + 1) * self.batch.global_batch_size]
            # Micro-batch k of rank r: consecutive slices interleaved by rank, disjoint across ranks.
            yield [chunk[(k * world + self.rank) * micro : (k * world + self.rank + 1) * micro] for k in range(accum)]


def collate(examples: list[TokenizedExample], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch. Padding is masked by position (attention mask and labels), never by token id."""
    longest = max(len(e.input_ids) for e in examples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

"""The one place batches are assembled: what the sampler draws, collated, with each step's counts.

    python launch/preview.py +exp=tiny_cpu data.packing=true preview.format=json   # these batches, printed

A *unit* is what the sampler draws: one example, or one packed row of examples (``data.packing``). Training
steps, eval, the export probe and ``launch/preview.py`` all get their tensors from here. Under sequence parallelism
(``parallel.sp_size``) a training micro-batch is cut along the sequence here too, one piece per rank of the group.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import astuple, dataclass
from typing import Iterator, Sequence

import torch

from dtrain.config.batch import BatchPlan
from dtrain.config.schema import LengthGrouping
from dtrain.data.batching import StepSampler, collate
from dtrain.data.chat import IGNORE_INDEX, TokenizedExample
from dtrain.data.dataset import PreparedData
from dtrain.data.packing import collate_packed, pack_examples, padding_efficiency
from dtrain.data.prefetch import Prefetcher
from dtrain.errors import ConfigError
from dtrain.loss import count_trained_tokens, shift_labels

log = logging.getLogger("dtrain")

Unit = list[TokenizedExample]


@dataclass
class BatchStats:
    """Counts of one rank's share of a step; summed over ranks with one all-reduce."""

    trained_tokens: int = 0
    """Positions that carry loss after the causal shift (the loss normaliser)."""
    real_tokens: int = 0
    token_slots: int = 0
    """Real tokens + padding: the tensor sizes the model runs on."""
    sum_sq_lengths: int = 0
    """Sum over examples of length**2: attention FLOPs."""
    fingerprint: int = 0
    """Sum of crc32 of the sample ids: equal over a step <=> the same examples."""

    def as_list(self) -> list[int]:
        return list(astuple(self))

    @classmethod
    def from_list(cls, values: Sequence[float]) -> BatchStats:
        return cls(*(int(v) for v in values))


@dataclass
class StepBatch:
    """This rank's micro-batches of one optimizer step, collated, with their counts."""

    epoch: int
    micro_batches: list[dict[str, torch.Tensor]]
    examples: list[TokenizedExample]
    stats: BatchStats
    data_wait_s: float
    """How long the training thread waited for it (the step's data phase)."""


def make_units(examples: Sequence[TokenizedExample], packing: bool, max_seq_len: int, seed: int) -> list[Unit]:
    """Single examples, or packed rows of at most ``max_seq_len`` tokens (best-fit decreasing, seeded)."""
    if not packing:
        return [[e] for e in examples]
    rows = pack_examples([len(e.input_ids) for e in examples], max_seq_len, seed)
    return [[examples[i] for i in row] for row in rows]


def collate_units(units: Sequence[Unit], packing: bool, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Tensors of a micro-batch of units: packed rows with restarting ``position_ids``, or right-padded examples."""
    if packing:
        return with_targets(collate_packed(list(units), pad_token_id))
    return with_targets(collate([unit[0] for unit in units], pad_token_id))


def with_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The collated ``labels`` replaced by next-token ``targets``: the one causal shift, made before any cut."""
    batch["targets"] = shift_labels(batch.pop("labels"))
    return batch


def sequence_shard(batch: dict[str, torch.Tensor], sp_rank: int, sp_size: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Piece ``sp_rank`` of ``sp_size`` of every row of a collated micro-batch (Ulysses sequence parallelism).

    The rows are padded to a multiple of ``sp_size`` and cut along the sequence. The targets were shifted before the
    cut (``with_targets``), so the last token of a piece keeps the label of the next piece's first token. Every piece
    carries ``position_ids`` (a padded row gets ``0..width-1``, a packed row keeps its own): the attention all-to-all
    gathers them to rebuild the whole sequence's positions and examples. No attention mask: right padding follows
    every real token, so causal attention keeps it out of them.

    Args:
        batch: A micro-batch from ``collate_units`` (``input_ids``, ``targets``, ``position_ids`` when packed).
        sp_rank: This rank's place in its sequence-parallel group.
        sp_size: Ranks per group.
        pad_token_id: Id of the added padding (never trained: its targets are ignored).
    """
    rows, width = batch["input_ids"].shape
    extra = -width % sp_size
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(width).expand(rows, width)
    # The added padding continues each row's positions: after every real token, it is never attended to by one.
    positions = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(extra)], dim=1)
    input_ids = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_token_id)
    targets = torch.nn.functional.pad(batch["targets"], (0, extra), value=IGNORE_INDEX)
    piece = (width + extra) // sp_size
    cut = slice(sp_rank * piece, (sp_rank + 1) * piece)
    return {k: v[:, cut].contiguous() for k, v in (("input_ids", input_ids), ("position_ids", positions), ("targets", targets))}


def unit_length(unit: Unit) -> int:
    return sum(len(e.input_ids) for e in unit)


class TrainLoader:
    """Units, the sampler over them, collation ahead of the step (a background thread) and per-step counts.

    Args:
        examples: The tokenised training examples.
        batch: The batch plan.
        rank: This rank. Its data-parallel rank picks the sampler's slice of every step, its place in its
            sequence-parallel group (``batch.sp_size`` > 1) the piece of every row it trains.
        packing: Draw packed rows instead of single examples (decided by the resolution step).
        max_seq_len: Row capacity when packing.
        seed: Shuffle and packing seed.
        grouping: ``data.group_by_length``.
        pad_token_id: Padding id (masked by position, never by id).
    """

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        batch: BatchPlan,
        rank: int,
        *,
        packing: bool,
        max_seq_len: int,
        seed: int,
        grouping: LengthGrouping,
        pad_token_id: int,
    ):
        self.packing = packing
        data_parallel_rank, self.sp_rank = batch.place(rank)
        self.sp_size = batch.sp_size
        self.pad_token_id = pad_token_id
        self.num_examples = len(examples)
        self.max_seq_len = max_seq_len
        self.units = make_units(examples, packing, max_seq_len, seed)
        self.lengths = [unit_length(u) for u in self.units]
        self.sampler = StepSampler(len(self.units), batch, data_parallel_rank, seed, self.lengths, grouping)
        self.unit_name = "packed rows" if packing else "examples"
        if self.sampler.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(self.units)} training {self.unit_name} do not fill one global batch of {batch.global_batch_size} "
                "(micro_batch_size x grad_accum_steps x world size); lower the batch size or add data"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def collate(self, units: Sequence[Unit]) -> dict[str, torch.Tensor]:
        batch = collate_units(units, self.packing, self.pad_token_id)
        if self.sp_size == 1:
            return batch
        return sequence_shard(batch, self.sp_rank, self.sp_size, self.pad_token_id)

    def step_batches(self, start_step: int, pin_memory: bool = False) -> Iterator[StepBatch]:
        """This rank's batches from global step ``start_step`` on, epoch after epoch, without end.

        The order is a pure function of the seed and the step (``StepSampler``), so a resumed run continues with
        exactly the batches it would have seen. Close the iterator (``contextlib.closing``) to stop the thread.
        """
        step = start_step
        while True:
            epoch, start = divmod(step, self.steps_per_epoch)
            # The next steps' batches are collated (and pinned on a GPU machine) while this step computes.
            with Prefetcher(
                self.sampler.steps(epoch, start), lambda idx: self.collate([self.units[i] for i in idx]), pin_memory=pin_memory
            ) as prefetched:
                for micro_indices, batches, wait_s in prefetched:
                    examples = [e for idx in micro_indices for i in idx for e in self.units[i]]
                    # The ranks of a sequence-parallel group share these examples: one of them counts them.
                    counted = examples if self.sp_rank == 0 else []
                    yield StepBatch(epoch, batches, examples, step_stats(counted, batches), wait_s)
                    step += 1

    def planned_padding_efficiency(self) -> float:
        """Real tokens / token slots over epoch 0's micro-batches on all ranks (lengths only, no tensors)."""
        s = self.sampler
        micro_batches = (
            [self.lengths[i] for i in idx]
            for rank in range(s.batch.data_parallel_size)
            for step in StepSampler(s.num_examples, s.batch, rank, s.seed, s.lengths, s.grouping).steps(0)
            for idx in step
        )
        return padding_efficiency(micro_batches)

    def log_plan(self, data: PreparedData, total_steps: int) -> None:
        """The start-up lines that say what will be trained, how it is batched and what was left out."""
        b = self.sampler.batch
        trained = sum(e.num_trained for e in data.train)
        total = sum(len(e.input_ids) for e in data.train)
        log.info(
            "batch: %d micro x %d accumulation x %d data-parallel ranks = %d %s per optimizer step%s",
            b.micro_batch_size,
            b.grad_accum_steps,
            b.data_parallel_size,
            b.global_batch_size,
            self.unit_name,
            f" (each row cut into {self.sp_size} pieces, one per rank of a sequence-parallel group)" if self.sp_size > 1 else "",
        )
        log.info(
            "data: %d train / %d eval examples, %d tokens of which %d trained (%.1f%%); %d steps/epoch, %d total steps",
            len(data.train),
            len(data.eval),
            total,
            trained,
            100.0 * trained / max(total, 1),
            self.steps_per_epoch,
            total_steps,
        )
        for reason, count in sorted(data.dropped.items()):
            log.warning("dropped %d example(s): %s", count, reason)
        for reason, count in sorted(data.truncated.items()):
            log.warning("%d example(s) %s", count, reason)
        for reason, count in sorted(data.split.items()):
            log.warning("%d conversation(s) %s", count, reason)
        if self.packing:
            log.info("packing: %d examples into %d rows of <= %d tokens", self.num_examples, len(self.units), self.max_seq_len)
        layout = f"{'packed' if self.packing else 'padded'}, group_by_length={self.sampler.grouping.value}"
        log.info(
            "padding efficiency (real tokens / token slots) planned for epoch 0: %.1f%% (%s)",
            100 * self.planned_padding_efficiency(),
            layout,
        )
        if self.sampler.unused_per_epoch:
            log.info(
                "%d %s per epoch do not fill a global batch; each epoch's shuffle leaves out different ones",
                self.sampler.unused_per_epoch,
                self.unit_name,
            )


def step_stats(examples: Sequence[TokenizedExample], batches: Sequence[dict[str, torch.Tensor]]) -> BatchStats:
    """The counts of one rank's share of a step."""
    return BatchStats(
        trained_tokens=sum(count_trained_tokens(b["targets"]) for b in batches),
        real_tokens=sum(len(e.input_ids) for e in examples),
        token_slots=sum(b["input_ids"].numel() for b in batches),
        sum_sq_lengths=sum(len(e.input_ids) ** 2 for e in examples),
        fingerprint=sum(zlib.crc32(e.source.encode()) for e in examples),
    )


def eval_batches(
    examples: Sequence[TokenizedExample], rank: int, world_size: int, micro_batch_size: int, pad_token_id: int
) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """This rank's eval micro-batches and their trained-token counts: the same number of batches on every rank
    (each forward is a ZeRO-3 collective); a rank with fewer examples gets a fully masked filler batch that adds
    nothing to the loss sums.
    """
    shard = list(examples[rank::world_size])
    num_batches = math.ceil(math.ceil(len(examples) / world_size) / micro_batch_size)
    filler = TokenizedExample("<filler>", examples[0].input_ids, [IGNORE_INDEX] * len(examples[0].input_ids))
    for k in range(num_batches):
        batch = with_targets(collate(shard[k * micro_batch_size : (k + 1) * micro_batch_size] or [filler], pad_token_id))
        yield batch, count_trained_tokens(batch["targets"])


def probe_batch(examples: Sequence[TokenizedExample], pad_token_id: int, max_tokens: int = 256) -> dict[str, torch.Tensor]:
    """A short padded batch of the first examples, each cut to ``max_tokens`` (cheap to re-run on CPU)."""
    cut = [TokenizedExample(e.source, e.input_ids[:max_tokens], e.labels[:max_tokens]) for e in examples]
    return with_targets(collate(cut, pad_token_id))

"""The one place batches are assembled: what the sampler draws, collated, with each step's counts.

    python launch/preview.py +exp=tiny_cpu data.packing=true preview.format=json   # these batches, printed

A *unit* is what the sampler draws: one example, or one packed row of examples (``data.packing``), held as
indices into the token store, never as examples: the store is read when a step's batch is collated. With a
mixture of several sources, an epoch draws each source's examples by its weight (``dtrain.data.mixture``) and
the micro-batches carry each target's source for the per-source losses. Training steps, eval, the export probe and
``launch/preview.py`` all get their tensors from here. Under sequence parallelism (``parallel.sp_size``) a training
micro-batch is cut along the sequence here too, one piece per rank of the group.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import astuple, dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from dtrain.config.batch import BatchPlan
from dtrain.config.schema import LengthGrouping
from dtrain.data.batching import StepSampler, collate
from dtrain.data.chat import IGNORE_INDEX, TokenizedExample
from dtrain.data.dataset import PreparedData
from dtrain.data.mixture import epoch_examples
from dtrain.data.packing import collate_packed, pack_examples, padding_efficiency
from dtrain.data.prefetch import Prefetcher
from dtrain.errors import ConfigError
from dtrain.loss import count_trained_tokens, shift_labels

log = logging.getLogger("dtrain")


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


class SourceLosses:
    """Per-source loss sums and trained-token counts on this rank, reduced in the same all-reduce as the loss.

    Args:
        names: The sources' names, by source index.
    """

    def __init__(self, names: list[str]):
        self.names = names
        self.loss_sums: Optional[torch.Tensor] = None  # on the loss's device: read once, with the step's loss
        self.tokens = torch.zeros(len(names), dtype=torch.float64)

    def add(self, loss_sums: Optional[torch.Tensor], targets: torch.Tensor, groups: torch.Tensor) -> None:
        """Add one micro-batch: its per-source loss sums (``BatchLoss.source_sums``, left on the device: no host sync
        per micro-batch) and its collated ``targets`` and ``target_sources`` (host tensors)."""
        if loss_sums is not None:
            summed = loss_sums.detach().double()
            self.loss_sums = summed if self.loss_sums is None else self.loss_sums + summed
        trained = (targets != IGNORE_INDEX) & (groups >= 0)
        self.tokens += torch.bincount(groups[trained].cpu(), minlength=len(self.names))[: len(self.names)].double()

    def as_list(self) -> list[float]:
        loss_sums = self.loss_sums.tolist() if self.loss_sums is not None else [0.0] * len(self.names)
        return loss_sums + self.tokens.tolist()

    def losses(self, reduced: list[float]) -> dict[str, float]:
        """Token-mean loss per source from the reduced ``as_list`` values; sources without a token are left out."""
        n = len(self.names)
        return {name: reduced[s] / reduced[n + s] for s, name in enumerate(self.names) if reduced[n + s] > 0}


@dataclass
class StepBatch:
    """This rank's micro-batches of one optimizer step, collated, with their counts."""

    epoch: int
    micro_batches: list[dict[str, torch.Tensor]]
    examples: list[TokenizedExample]
    stats: BatchStats
    data_wait_s: float
    """How long the training thread waited for it (the step's data phase)."""


def example_lengths(examples: Sequence[TokenizedExample]) -> np.ndarray:
    """Tokens per example: the store's lengths array, or counted for a plain list."""
    lengths = getattr(examples, "lengths", None)
    return np.asarray(lengths if lengths is not None else [len(e.input_ids) for e in examples], dtype=np.int64)


class Units:
    """The units of a run as example indices: one example each, or packed rows of at most ``max_seq_len`` tokens
    (best-fit decreasing, seeded): a flat index array and row offsets, about 16 bytes per example."""

    def __init__(self, lengths: np.ndarray, drawn: np.ndarray, packing: bool, max_seq_len: int, seed: int):
        """
        Args:
            lengths: Tokens per example of the store.
            drawn: The examples one epoch draws (``mixture.epoch_examples``), repeats allowed.
            packing: Pack rows.
            max_seq_len: Row capacity when packing.
            seed: Packing seed.
        """
        drawn = np.asarray(drawn, dtype=np.int64)
        self.offsets: Optional[np.ndarray] = None
        self.members = drawn
        self.lengths = lengths[drawn]
        if packing and len(drawn):
            rows = pack_examples(self.lengths.tolist(), max_seq_len, seed)
            order = np.fromiter((i for row in rows for i in row), np.int64, len(drawn))
            self.members = drawn[order]
            self.offsets = np.cumsum([0] + [len(row) for row in rows], dtype=np.int64)
            self.lengths = np.add.reduceat(lengths[self.members], self.offsets[:-1])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, u: int) -> np.ndarray:
        """The example indices of unit ``u``."""
        if self.offsets is None:
            return self.members[u : u + 1]
        return self.members[self.offsets[u] : self.offsets[u + 1]]


def collate_units(units: Sequence[Sequence[TokenizedExample]], packing: bool, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Tensors of a micro-batch of units: packed rows with restarting ``position_ids``, or right-padded examples."""
    if packing:
        return with_targets(collate_packed([list(unit) for unit in units], pad_token_id))
    return with_targets(collate([unit[0] for unit in units], pad_token_id))


def with_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The collated ``labels`` replaced by next-token ``targets``: the one causal shift, made before any cut."""
    batch["targets"] = shift_labels(batch.pop("labels"))
    return batch


def with_target_sources(batch: dict[str, torch.Tensor], sources: torch.Tensor) -> dict[str, torch.Tensor]:
    """``target_sources``: the source of each target, shifted like the targets (-1: none)."""
    shifted = torch.full_like(sources, -1)
    shifted[:, :-1] = sources[:, 1:]
    batch["target_sources"] = shifted
    return batch


def sequence_shard(batch: dict[str, torch.Tensor], sp_rank: int, sp_size: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Piece ``sp_rank`` of ``sp_size`` of every row of a collated micro-batch (Ulysses sequence parallelism).

    The rows are padded to a multiple of ``sp_size`` and cut along the sequence. The targets were shifted before the
    cut (``with_targets``), so the last token of a piece keeps the label of the next piece's first token. Every piece
    carries ``position_ids`` (a padded row gets ``0..width-1``, a packed row keeps its own): the attention all-to-all
    gathers them to rebuild the whole sequence's positions and examples. No attention mask: right padding follows
    every real token, so causal attention keeps it out of them.

    Args:
        batch: A micro-batch from ``collate_units`` (``input_ids``, ``targets``, ``position_ids`` when packed,
            ``target_sources`` in a mixture).
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
    padded = {
        "position_ids": torch.cat([positions, positions[:, -1:] + 1 + torch.arange(extra)], dim=1),
        "input_ids": torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_token_id),
        "targets": torch.nn.functional.pad(batch["targets"], (0, extra), value=IGNORE_INDEX),
    }
    if "target_sources" in batch:
        padded["target_sources"] = torch.nn.functional.pad(batch["target_sources"], (0, extra), value=-1)
    piece = (width + extra) // sp_size
    cut = slice(sp_rank * piece, (sp_rank + 1) * piece)
    return {k: v[:, cut].contiguous() for k, v in padded.items()}


class TrainLoader:
    """Units, the sampler over them, collation ahead of the step (a background thread) and per-step counts.

    Args:
        examples: The tokenised training examples (a ``TokenStore``, or a list).
        batch: The batch plan.
        rank: This rank. Its data-parallel rank picks the sampler's slice of every step, its place in its
            sequence-parallel group (``batch.sp_size`` > 1) the piece of every row it trains.
        packing: Draw packed rows instead of single examples (decided by the resolution step).
        max_seq_len: Row capacity when packing.
        seed: Shuffle, mixture and packing seed.
        grouping: ``data.group_by_length``.
        pad_token_id: Padding id (masked by position, never by id).
        weights: Each source's mixture weight, by source index (``data.sources``); one source of weight 1 by default.
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
        weights: Sequence[float] = (1.0,),
    ):
        self.examples = examples
        self.packing = packing
        data_parallel_rank, self.sp_rank = batch.place(rank)
        self.sp_size = batch.sp_size
        self.pad_token_id = pad_token_id
        self.max_seq_len = max_seq_len
        self.example_lengths = example_lengths(examples)
        source_index = getattr(examples, "source_index", None)
        self.source_index = np.asarray(source_index) if source_index is not None else np.zeros(len(examples), np.int16)
        self.num_sources = len(weights)
        self.drawn = epoch_examples(self.source_index, weights, seed)
        self.units = Units(self.example_lengths, self.drawn, packing, max_seq_len, seed)
        self.lengths = self.units.lengths
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

    def unit_examples(self, u: int) -> list[TokenizedExample]:
        """The examples of unit ``u``, read from the store."""
        return [self.examples[int(i)] for i in self.units[u]]

    def collate(self, unit_indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The tensors of a micro-batch of units (by unit index); with several sources also ``target_sources``; this
        rank's piece of every row under sequence parallelism."""
        batch = collate_units([self.unit_examples(u) for u in unit_indices], self.packing, self.pad_token_id)
        if self.num_sources > 1:
            members = [self.units[u] for u in unit_indices]
            sources = source_ids(members, self.example_lengths, self.source_index, batch["input_ids"].shape[1])
            batch = with_target_sources(batch, sources)
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
            with Prefetcher(self.sampler.steps(epoch, start), self.collate, pin_memory=pin_memory) as prefetched:
                for micro_indices, batches, wait_s in prefetched:
                    examples = [e for idx in micro_indices for u in idx for e in self.unit_examples(u)]
                    # The ranks of a sequence-parallel group share these examples: one of them counts them.
                    counted = examples if self.sp_rank == 0 else []
                    yield StepBatch(epoch, batches, examples, step_stats(counted, batches), wait_s)
                    step += 1

    def planned_padding_efficiency(self) -> float:
        """Real tokens / token slots over epoch 0's micro-batches on all ranks (lengths only, no tensors).

        Every micro-batch of every rank is a consecutive ``micro_batch_size`` slice of the epoch's order, so the
        slices of one order are all of them.
        """
        s = self.sampler
        micro, used = s.batch.micro_batch_size, s.steps_per_epoch * s.batch.global_batch_size
        order = s.epoch_order(0)[:used]
        return padding_efficiency([self.lengths[i] for i in order[k : k + micro]] for k in range(0, used, micro))

    def log_plan(self, data: PreparedData, total_steps: int) -> None:
        """The start-up lines that say what will be trained, how it is batched and what was left out."""
        b = self.sampler.batch
        train = data.train
        trained, total = int(np.sum(train.num_trained, dtype=np.int64)), int(np.sum(self.example_lengths))
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
            len(train),
            len(data.eval),
            total,
            trained,
            100.0 * trained / max(total, 1),
            self.steps_per_epoch,
            total_steps,
        )
        if len(data.source_names) > 1 or self.num_sources > 1:
            for line in self.mixture_lines(data):
                log.info("%s", line)
        for reason, count in sorted(data.dropped.items()):
            log.warning("dropped %d example(s): %s", count, reason)
        for reason, count in sorted(data.truncated.items()):
            log.warning("%d example(s) %s", count, reason)
        for reason, count in sorted(data.split.items()):
            log.warning("%d conversation(s) %s", count, reason)
        for reason, count in sorted(data.notes.items()):
            log.warning("%d record(s) %s", count, reason)
        if self.packing:
            log.info("packing: %d examples into %d rows of <= %d tokens", len(self.drawn), len(self.units), self.max_seq_len)
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

    def mixture_lines(self, data: PreparedData) -> list[str]:
        """Per source: examples and tokens prepared, and examples and tokens an epoch draws (its share)."""
        n = len(data.source_names)
        prepared = np.bincount(self.source_index, minlength=n)
        prepared_tokens = np.bincount(self.source_index, weights=self.example_lengths, minlength=n)
        drawn_sources = self.source_index[self.drawn]
        drawn = np.bincount(drawn_sources, minlength=n)
        drawn_tokens = np.bincount(drawn_sources, weights=self.example_lengths[self.drawn], minlength=n)
        eval_counts = np.bincount(np.asarray(data.eval.source_index), minlength=n) if len(data.eval) else np.zeros(n, int)
        lines = ["mixture (per epoch: examples drawn, share of the epoch's tokens):"]
        for s, name in enumerate(data.source_names):
            lines.append(
                f"  {name}: {prepared[s]} train examples ({int(prepared_tokens[s])} tokens), {eval_counts[s]} eval; "
                f"drawn {drawn[s]} ({100 * drawn_tokens[s] / max(drawn_tokens.sum(), 1):.1f}% of tokens)"
            )
        return lines


def source_ids(units: Sequence[Sequence[int]], lengths: np.ndarray, source_index: np.ndarray, width: int) -> torch.Tensor:
    """``[rows, width]``: the mixture source of each token position (-1 on padding), laid out as collation lays out
    the units' examples (back to back from position 0)."""
    out = torch.full((len(units), width), -1, dtype=torch.long)
    for r, unit in enumerate(units):
        offset = 0
        for i in unit:
            n = int(lengths[i])
            out[r, offset : offset + n] = int(source_index[i])
            offset += n
    return out


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
    examples: Sequence[TokenizedExample], rank: int, world_size: int, micro_batch_size: int, pad_token_id: int, num_sources: int = 1
) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """This rank's eval micro-batches and their trained-token counts: the same number of batches on every rank
    (each forward is a ZeRO-3 collective); a rank with fewer examples gets a fully masked filler batch that adds
    nothing to the loss sums. With several sources (``num_sources``) the batches carry ``target_sources``.
    """
    shard = list(range(rank, len(examples), world_size))
    num_batches = math.ceil(math.ceil(len(examples) / world_size) / micro_batch_size)
    lengths, sources = example_lengths(examples), getattr(examples, "source_index", None)
    first = examples[0]
    filler = TokenizedExample("<filler>", first.input_ids, [IGNORE_INDEX] * len(first.input_ids))
    for k in range(num_batches):
        indices = shard[k * micro_batch_size : (k + 1) * micro_batch_size]
        batch = with_targets(collate([examples[i] for i in indices] or [filler], pad_token_id))
        if num_sources > 1:
            ids = source_ids([[i] for i in indices] or [[0]], lengths, sources, batch["input_ids"].shape[1])
            batch = with_target_sources(batch, ids if indices else ids.fill_(-1))
        yield batch, count_trained_tokens(batch["targets"])


def probe_batch(examples: Sequence[TokenizedExample], pad_token_id: int, max_tokens: int = 256) -> dict[str, torch.Tensor]:
    """A short padded batch of the first examples, each cut to ``max_tokens`` (cheap to re-run on CPU)."""
    cut = [TokenizedExample(e.source, e.input_ids[:max_tokens], e.labels[:max_tokens]) for e in examples]
    return with_targets(collate(cut, pad_token_id))

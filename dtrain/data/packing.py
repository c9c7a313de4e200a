"""Padding-free packing: several examples per row, no attention and no labels across their boundaries.

Each packed row carries ``position_ids`` that restart at 0 for every example and no ``attention_mask``; from
that, transformers builds a block-diagonal causal mask (sdpa, eager) or calls flash-attn's varlen kernel, so
an example never attends to its neighbours (``use_cache=False`` in training).
"""

from __future__ import annotations

import bisect
import random
from typing import Iterable, Sequence

import numpy as np
import torch

from dtrain.data.chat import IGNORE_INDEX, TokenizedExample


def pack_examples(lengths: list[int], max_len: int, seed: int) -> list[list[int]]:
    """Best-fit decreasing bin packing of example lengths into rows of at most ``max_len`` tokens.

    Ties in length are ordered by a seeded shuffle, so the same seed gives the same rows.

    Returns:
        Rows, each a list of example indices.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the shuffled order
    rows: list[list[int]] = []
    # Open rows grouped by remaining capacity; `capacities` holds the distinct capacities in ascending order
    # (at most max_len + 1 values), so finding the tightest row that fits is one bisect.
    capacities: list[int] = []
    rows_by_capacity: dict[int, list[int]] = {}
    for i in order:
        if lengths[i] > max_len:
            raise ValueError(f"example {i} has {lengths[i]} tokens > max_len={max_len}; truncate or drop it first")
        pos = bisect.bisect_left(capacities, lengths[i])
        if pos < len(capacities):
            capacity = capacities[pos]
            row = rows_by_capacity[capacity].pop()
            if not rows_by_capacity[capacity]:
                del rows_by_capacity[capacity]
                capacities.pop(pos)
        else:
            row, capacity = len(rows), max_len
            rows.append([])
        rows[row].append(i)
        remaining = capacity - lengths[i]
        if remaining > 0:
            if remaining not in rows_by_capacity:
                bisect.insort(capacities, remaining)
                rows_by_capacity[remaining] = []
            rows_by_capacity[remaining].append(row)
    return rows


def collate_packed(rows: list[list[TokenizedExample]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples; ``position_ids`` restart per example, padding is one more block.

    The first label of every example is masked: it would otherwise be the target of the previous example's last
    token. (Unpacked, that label is never a target either, so packing changes no loss.)
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for e in row:
            n = len(e.input_ids)
            input_ids[r, offset : offset + n] = torch.tensor(e.input_ids)
            labels[r, offset + 1 : offset + n] = torch.tensor(e.labels[1:])
            position_ids[r, offset : offset + n] = torch.arange(n)
            offset += n
        position_ids[r, offset:] = torch.arange(width - offset)  # padding: a block of its own, never trained
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


AUTO_PACKING_BELOW = 0.90


def padding_efficiency(micro_batches: Iterable[list[int]]) -> float:
    """Real tokens / token slots of micro-batches given as their units' lengths (each padded to its longest)."""
    real = slots = 0
    for lengths in micro_batches:
        real += sum(lengths)
        slots += max(lengths) * len(lengths)
    return real / max(slots, 1)


def padded_efficiency(lengths: Sequence[int], micro_batch: int, seed: int) -> float:
    """Real tokens / token slots when ``lengths`` are padded in shuffled micro-batches of ``micro_batch``."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    shuffled = np.asarray(lengths, dtype=np.int64)[order]
    full = len(shuffled) // micro_batch * micro_batch
    slots = int(shuffled[:full].reshape(-1, micro_batch).max(axis=1).sum()) * micro_batch
    if full < len(shuffled):
        slots += int(shuffled[full:].max()) * (len(shuffled) - full)
    return int(shuffled.sum()) / max(slots, 1)


def choose_packing(lengths: Sequence[int], micro_batch: int, seed: int) -> tuple[bool, float]:
    """``data.packing=null``: pack when the data is mixed-length, i.e. padded micro-batches in shuffled order would
    hold under 90% real tokens (before ``data.group_by_length`` sorts them: a property of the data, not the layout).
    Deterministic: the same data, batch and seed give the same answer on every rank and every restart.

    Returns:
        ``(pack, padded efficiency)``.
    """
    efficiency = padded_efficiency(lengths, micro_batch, seed)
    return micro_batch > 1 and efficiency < AUTO_PACKING_BELOW, efficiency

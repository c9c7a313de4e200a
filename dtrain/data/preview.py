"""Showing exactly which tokens are trained: highlighted text for people, JSON for other tools.

python launch/preview.py +exp=tiny_cpu preview.n=3
python launch/preview.py +exp=tiny_cpu data.packing=true preview.format=json
"""

from __future__ import annotations

import json
from typing import Callable

from dtrain.data.chat import IGNORE_INDEX, TokenizedExample

GREEN, RESET = "\033[1;32m", "\033[0m"


def highlight(example: TokenizedExample, tokenizer, color: bool) -> str:
    """The rendered example with its trained tokens marked (ANSI green, or ``[[...]]`` without colour)."""
    opened, closed = (GREEN, RESET) if color else ("[[", "]]")
    out, trained_run = [], False
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE_INDEX
        if trained != trained_run:
            out.append(opened if trained else closed)
            trained_run = trained
        out.append(tokenizer.decode([token]))
    if trained_run:
        out.append(closed)
    return "".join(out)


def preview_text(units: list[list[TokenizedExample]], tokenizer, color: bool) -> str:
    """One block per unit (an example, or a packed row whose example boundaries are marked)."""
    blocks = []
    for k, unit in enumerate(units):
        tokens = sum(len(e.input_ids) for e in unit)
        trained = sum(e.num_trained for e in unit)
        kind = f"packed row {k} ({len(unit)} examples)" if len(unit) > 1 else f"example {unit[0].source}"
        lines = [f"=== {kind}: {tokens} tokens, {trained} trained"]
        for i, e in enumerate(unit):
            if len(unit) > 1:
                lines.append(f"--- example {i}: {e.source} (position_ids restart at 0)")
            lines.append(highlight(e, tokenizer, color))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def preview_json(units: list[list[TokenizedExample]], collate_unit: Callable[[list[TokenizedExample]], dict], packed: bool) -> list[str]:
    """One JSON line per unit with the exact tensors the loop will see: ``targets[t]`` is the token position ``t`` is
    trained to predict (the labels shifted by one, -100 = no loss).

    Args:
        collate_unit: The loader's collation of one unit into a batch of one row.
    """
    lines = []
    for unit in units:
        # A row of one example has no padding: its attention mask is all ones and says nothing.
        tensors = {k: v[0].tolist() for k, v in collate_unit(unit).items() if k != "attention_mask"}
        sources = {"sources": [e.source for e in unit]} if packed else {"source": unit[0].source}
        lines.append(json.dumps({**sources, **tensors}))
    return lines

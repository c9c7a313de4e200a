"""Showing exactly which tokens are trained: highlighted text for people, JSON for other tools.

python launch/preview.py +exp=tiny_cpu preview.n=3
python launch/preview.py +exp=tiny_cpu data.packing=true preview.format=json
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable

from dtrain.data.chat import IGNORE_INDEX, TokenizedExample

if TYPE_CHECKING:
    from dtrain.config.schema import JobConfig

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


def preview_job(job: JobConfig, color: bool = False) -> str:
    """What ``launch/preview.py`` prints: the first ``preview.n`` training units of ``job``, as text or JSON lines.

    Loads no model: only the tokenizer and the data, resolved and batched exactly as training does
    (``dtrain.resolve``, ``dtrain.data.loader``); the token store is prepared when missing, so training then finds it.

    Raises:
        DataError: Bad data (named by file and line).
        ConfigError: A data setting that cannot work.
    """
    # Imported here: the training pieces import this package.
    from dtrain.config.batch import BatchPlan
    from dtrain.config.checks import check_data_sources
    from dtrain.config.schema import PreviewFormat
    from dtrain.data.cache import load_or_prepare
    from dtrain.data.loader import TrainLoader, collate_units
    from dtrain.data.mixture import mixture_weights
    from dtrain.resolve import resolve_job
    from dtrain.setup import load_renderer

    check_data_sources(job.data)
    renderer = load_renderer(job)
    tokenizer = renderer.tokenizer
    data = load_or_prepare(job.data, renderer, job.train.seed, job.generate.num_prompts, is_local_main=True, barrier=lambda: None)
    job = resolve_job(job, data.train.lengths, world_size=1).job
    # The training loader over the same units; a step of one unit, since only the units are shown, in data order.
    loader = TrainLoader(
        data.train,
        BatchPlan(1, 1, 1),
        0,
        packing=bool(job.data.packing),
        max_seq_len=job.data.max_seq_len,
        seed=job.train.seed,
        grouping=job.data.group_by_length,
        pad_token_id=tokenizer.pad_token_id,
        weights=mixture_weights(job.data, data.source_names),
    )
    units = [loader.unit_examples(u) for u in range(min(job.preview.n, len(loader.units)))]
    if job.preview.format == PreviewFormat.json:
        return "\n".join(preview_json(units, lambda unit: collate_units([unit], loader.packing, loader.pad_token_id), loader.packing))
    return preview_text(units, tokenizer, color=color)

"""From data config to tokenized train/eval examples and held-out generation prompts, with counted drops."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from dtrain.config.schema import DataConfig, OnInvalid, Truncation
from dtrain.data.chat import ChatRenderer, ChatTemplateError, TokenizedExample
from dtrain.data.formats import Message, to_messages
from dtrain.data.sources import InvalidRecord, RawRecord, load_records
from dtrain.errors import DataError


@dataclass
class GenerationPrompt:
    """A held-out conversation cut before its last assistant turn, and the answer it should produce."""

    source: str
    messages: list[Message]
    reference: str


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    prompts: list[GenerationPrompt]
    dropped: Counter = field(default_factory=Counter)  # reason -> count, reported at start
    truncated: Counter = field(default_factory=Counter)
    split: Counter = field(default_factory=Counter)  # conversations trained as one example per assistant turn


# The keys the counters above report under (the start-up log prints "<count> <unit>(s) <reason>").
TEMPLATE_REFUSED = "rejected by the chat template"
SPLIT_PER_TURN = "split into one example per assistant turn (the chat template rewrites earlier turns, e.g. drops their <think> blocks)"


def prepare_data(cfg: DataConfig, renderer: ChatRenderer, seed: int, num_prompts: int) -> PreparedData:
    """Load, validate, render and filter the train and eval data.

    Invalid records, those the chat template refuses (its ``raise_exception``) included, stop the run with their
    file, line and reason (``data.on_invalid=error``) or are skipped and counted per reason (``skip``). A
    conversation the template renders differently turn by turn becomes one example per assistant turn, counted in
    ``split``. Over-length examples are dropped and counted (``data.truncation=drop``), truncated and counted
    (``truncate``) or stop the run (``error``). Examples left with no trained token are always dropped and counted,
    never trained as NaN.

    Args:
        cfg: The data config.
        renderer: Chat renderer built from the tokenizer.
        seed: Seed for the train/eval split when ``cfg.eval_path`` is unset.
        num_prompts: How many held-out generation prompts to keep.
    """
    train_records = load_records(cfg.path, cfg.split)
    if cfg.eval_path:
        eval_records = load_records(cfg.eval_path, cfg.split)
    else:
        train_records, eval_records = _split(train_records, cfg.eval_fraction, seed)
    if not train_records:
        raise DataError(f"{cfg.path}: no records")

    dropped: Counter = Counter()
    train_conversations = _validate(train_records, cfg, dropped)
    eval_conversations = _validate(eval_records, cfg, dropped)
    total = len(train_records) + len(eval_records)
    _check_invalid_fraction(dropped, total, cfg)
    tally = _Tally(dropped)
    train = _render_all(train_conversations, renderer, cfg, tally)
    evaluation = _render_all(eval_conversations, renderer, cfg, tally)
    _check_invalid_fraction(dropped, total, cfg)  # again, with the records the chat template refused
    if not train:
        raise DataError(f"{cfg.path}: every example was dropped ({dict(dropped)}); raise data.max_seq_len?")
    held_out = [(src, msgs) for src, msgs in eval_conversations if src not in tally.refused]
    prompts = [_to_prompt(src, msgs) for src, msgs in held_out[:num_prompts]]
    return PreparedData(train, evaluation, prompts, dropped, tally.truncated, tally.split)


@dataclass
class _Tally:
    """What rendering dropped, truncated, split and refused, counted per reason for the start-up log."""

    dropped: Counter
    truncated: Counter = field(default_factory=Counter)
    split: Counter = field(default_factory=Counter)
    refused: set = field(default_factory=set)  # sources of the records the chat template refused


def _check_invalid_fraction(dropped: Counter, total: int, cfg: DataConfig) -> None:
    counts = {reason: n for reason, n in dropped.items() if reason.startswith("invalid: ")}
    invalid = sum(counts.values())
    if invalid > cfg.max_invalid_fraction * total:
        listed = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
        raise DataError(
            f"{invalid} of {total} records are invalid ({listed}), more than data.max_invalid_fraction="
            f"{cfg.max_invalid_fraction}; fix the data (data.on_invalid=error names the first bad line) or raise the limit"
        )


def _validate(records: list[RawRecord], cfg: DataConfig, invalid: Counter) -> list[tuple[str, list[Message]]]:
    conversations = []
    for record in records:
        try:
            conversations.append((record.source, to_messages(record, cfg.format)))
        except InvalidRecord as e:
            if cfg.on_invalid == OnInvalid.error:
                raise DataError(f"{e}; fix that record, or set data.on_invalid=skip to skip and count such records") from None
            invalid[f"invalid: {e.reason}"] += 1
    return conversations


def _split(records: list[RawRecord], fraction: float, seed: int) -> tuple[list[RawRecord], list[RawRecord]]:
    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(records) * fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


Rendered = tuple[str, list[TokenizedExample], Optional[str]]  # source, its examples, or why the template refused it


def _render_chunk(renderer: ChatRenderer, chunk: list[tuple[str, list[Message]]]) -> list[Rendered]:
    out: list[Rendered] = []
    for source, messages in chunk:
        try:
            out.append((source, renderer.render_examples(messages, source), None))
        except ChatTemplateError as e:  # a bad record, counted or reported by the caller like any invalid record
            out.append((source, [], str(e)))
    return out


def _render_parallel(conversations, renderer: ChatRenderer, num_proc: int) -> list[Rendered]:
    """Render in ``num_proc`` processes (order preserved); one process renders in place."""
    if num_proc <= 1 or len(conversations) < 2 * num_proc:
        return _render_chunk(renderer, conversations)
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    size = -(-len(conversations) // (num_proc * 4))
    chunks = [conversations[i : i + size] for i in range(0, len(conversations), size)]
    with ProcessPoolExecutor(num_proc) as pool:
        return [e for part in pool.map(partial(_render_chunk, renderer), chunks) for e in part]


def _render_all(conversations, renderer: ChatRenderer, cfg: DataConfig, tally: _Tally) -> list[TokenizedExample]:
    out = []
    for source, examples, refused in _render_parallel(conversations, renderer, cfg.num_proc):
        if refused is not None:
            if cfg.on_invalid == OnInvalid.error:
                raise DataError(f"{refused}; fix that record, or set data.on_invalid=skip to skip and count such records")
            tally.dropped[f"invalid: {TEMPLATE_REFUSED}"] += 1
            tally.refused.add(source)
            continue
        if len(examples) > 1:
            tally.split[SPLIT_PER_TURN] += 1
        out += [e for e in (_fit(example, renderer, cfg, tally.dropped, tally.truncated) for example in examples) if e is not None]
    return out


def _fit(example: TokenizedExample, renderer: ChatRenderer, cfg: DataConfig, dropped: Counter, truncated: Counter):
    """``example`` within ``data.max_seq_len`` and with a trained token, or None (counted in ``dropped``)."""
    if len(example.input_ids) > cfg.max_seq_len:
        if cfg.truncation == Truncation.error:
            raise DataError(
                f"{example.source}: {len(example.input_ids)} tokens > data.max_seq_len={cfg.max_seq_len}; "
                "raise data.max_seq_len or set data.truncation=drop|truncate"
            )
        if cfg.truncation == Truncation.drop:
            dropped["longer than max_seq_len"] += 1
            return None
        example = renderer.truncate(example, cfg.max_seq_len)
        if example.num_trained == 0:
            dropped["no trained token left after truncation"] += 1
            return None
        truncated["truncated to max_seq_len"] += 1
    if example.num_trained == 0:
        dropped["no trained token"] += 1
        return None
    return example


def _to_prompt(source: str, messages: list[Message]) -> GenerationPrompt:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return GenerationPrompt(source, messages[:last], messages[last]["content"])

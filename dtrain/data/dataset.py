"""From data config to a token store of train/eval examples and held-out generation prompts, with counted drops.

Preparation streams: the records of each source are read one at a time and handed, in chunks, to ``data.num_proc``
worker processes that parse, validate, render, tokenise and fit them; the results come back in order and are
appended to the store's files. Neither the raw records nor the tokens of the corpus are ever held as a list.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

from dtrain.config.schema import DataConfig, OnInvalid, Truncation
from dtrain.data.chat import ChatRenderer, ChatTemplateError, TokenizedExample
from dtrain.data.conversation import Conversation, Message
from dtrain.data.formats import resolve_format, to_conversation
from dtrain.data.mixture import EVAL_PATH_SOURCE, Source, data_sources, field_mapping, template_kwargs
from dtrain.data.sources import InvalidRecord, Payload, count_records, iter_payloads, parse_payload
from dtrain.data.store import PackedExamples, SplitWriter, TokenStore, pack_examples, read_meta, write_meta
from dtrain.errors import DataError

log = logging.getLogger("dtrain")

CHUNK_RECORDS = 256
"""Records per task sent to a worker: big enough that inter-process traffic is small next to tokenising."""


@dataclass
class GenerationPrompt:
    """A held-out conversation cut before its last assistant turn, and the answer it should produce.

    The record's tools and template arguments are kept: the prompt renders as the training examples did.
    """

    source: str
    messages: list[Message]
    reference: str
    tools: Optional[list] = None
    template_kwargs: dict = field(default_factory=dict)
    reference_tool_calls: Optional[list] = None
    """The last assistant turn's tool calls, where it makes some (the generation check scores the emitted call)."""

    @property
    def conversation(self) -> Conversation:
        return Conversation(self.messages, self.tools, self.template_kwargs)


@dataclass
class PreparedData:
    """A prepared corpus: memory-mapped examples, prompts, and what preparation dropped, truncated and split."""

    train: Sequence[TokenizedExample]
    """A ``TokenStore`` (tests may hand in a list)."""
    eval: Sequence[TokenizedExample]
    prompts: list[GenerationPrompt]
    dropped: Counter = field(default_factory=Counter)  # reason -> count, reported at start
    truncated: Counter = field(default_factory=Counter)
    split: Counter = field(default_factory=Counter)  # conversations trained as one example per assistant turn
    notes: Counter = field(default_factory=Counter)
    """What the chat template ignores, counted in records (reasoning it does not render), reported at start."""
    source_names: list[str] = field(default_factory=list)
    """By source index (``TokenStore.source_index``)."""
    formats: dict[str, str] = field(default_factory=dict)
    """Each source's record format by name, ``(detected)`` appended where ``data.format=auto`` found it."""

    @property
    def max_token_id(self) -> int:
        """The largest token id of both splits (a store's from its ``meta.json``; a list of examples is scanned)."""
        return max(_max_token_id(self.train), _max_token_id(self.eval))


def _max_token_id(split: Sequence[TokenizedExample]) -> int:
    stored = getattr(split, "max_token_id", None)
    return stored if stored is not None else max((max(e.input_ids) for e in split), default=-1)


# The keys the counters above report under (the start-up log prints "<count> <unit>(s) <reason>").
TEMPLATE_REFUSED = "rejected by the chat template"
SPLIT_PER_TURN = "split into one example per assistant turn (the chat template rewrites earlier turns, e.g. drops their <think> blocks)"


def prepare_data(cfg: DataConfig, renderer: ChatRenderer, seed: int, num_prompts: int) -> PreparedData:
    """Prepare ``cfg``'s data into a temporary token store and open it (the files are unlinked once mapped).

    See ``prepare_store`` for what is checked, dropped and counted.
    """
    folder = Path(tempfile.mkdtemp(prefix="dtrain-prepared-"))
    try:
        prepare_store(cfg, renderer, seed, num_prompts, folder)
        return open_store(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # open maps keep the data readable until they are closed


def open_store(folder: Path) -> PreparedData:
    """The prepared data of a token store folder, memory-mapped."""
    meta = read_meta(folder)
    return PreparedData(
        train=TokenStore(folder, "train"),
        eval=TokenStore(folder, "eval"),
        prompts=[GenerationPrompt(**p) for p in meta["prompts"]],
        dropped=Counter(meta["dropped"]),
        truncated=Counter(meta["truncated"]),
        split=Counter(meta["split"]),
        notes=Counter(meta.get("notes", {})),
        source_names=meta["sources"],
        formats=meta.get("formats", {}),
    )


def prepare_store(
    cfg: DataConfig,
    renderer: ChatRenderer,
    seed: int,
    num_prompts: int,
    folder: Path,
    progress: bool = False,
    identity: Optional[dict] = None,
) -> dict:
    """Load, validate, render and filter the train and eval data of every source into a token store in ``folder``.

    Invalid records, those the chat template refuses (its ``raise_exception``) included, stop the run with their
    file, line and reason (``data.on_invalid=error``) or are skipped and counted per reason (``skip``). A
    conversation the template renders differently turn by turn becomes one example per assistant turn, counted in
    ``split``. Over-length examples are dropped and counted (``data.truncation=drop``), truncated and counted
    (``truncate``) or stop the run (``error``). Examples left with no trained token are always dropped and counted,
    never trained as NaN.

    Args:
        cfg: The data config.
        renderer: Chat renderer built from the tokenizer (each source may vary its masking and template).
        seed: Seed for each source's train/eval split when ``cfg.eval_path`` is unset.
        num_prompts: How many held-out generation prompts to keep.
        folder: An empty or missing folder; the store's files are written there.
        progress: Show a progress bar (records, tokens/s) on stderr.
        identity: What the store was prepared from (kept in ``meta.json`` to refuse a mismatched reuse).

    Returns:
        The store's ``meta.json`` content.
    """
    sources = data_sources(cfg)
    plans = [_plan_source(s, cfg, seed) for s in sources]
    if cfg.eval_path:
        plans.append(_eval_path_plan(cfg, sources))
    names = [s.name for s in sources] + ([EVAL_PATH_SOURCE] if cfg.eval_path and len(sources) > 1 else [])
    total_records = sum(p.records for p in plans)
    renderers = [renderer.for_source(p.source.train_on, p.source.chat_template) for p in plans]
    formats = {
        EVAL_PATH_SOURCE if p.eval_only else p.source.name: p.source.format.value + (" (detected)" if p.source.format_detected else "")
        for p in plans
    }
    worker = _ChunkWorker(renderers, [p.source for p in plans], cfg)
    folder.mkdir(parents=True, exist_ok=True)
    writers = {"train": SplitWriter(folder, "train"), "eval": SplitWriter(folder, "eval")}
    tally = _Tally()
    prompts: list[GenerationPrompt] = []
    num_proc = cfg.num_proc or len(os.sched_getaffinity(0))
    start = time.perf_counter()
    bar = _progress_bar(total_records, progress)
    try:
        for out in _map_in_order(worker, _chunks(plans), num_proc):
            tally.add(out)
            for split, packed in out.packed.items():
                writers[split].add_packed(packed, plans[out.plan].source.index)
            prompts += [_to_prompt(src, conv) for src, conv in out.eval_conversations[: max(0, num_prompts - len(prompts))]]
            invalid = sum(n for reason, n in tally.dropped.items() if reason.startswith("invalid: "))
            if invalid > cfg.max_invalid_fraction * total_records:  # no need to read on: the run cannot start
                _check_invalid_fraction(tally.dropped, total_records, cfg)
            bar.update(out.records)
            tokens = writers["train"].num_tokens + writers["eval"].num_tokens
            bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.3g}", refresh=False)
    finally:
        bar.close()
        stats = {split: w.close() for split, w in writers.items()}
    _check_invalid_fraction(tally.dropped, total_records, cfg)
    if stats["train"]["examples"] == 0:
        raise DataError(f"{', '.join(s.path for s in sources)}: every example was dropped ({dict(tally.dropped)}); raise data.max_seq_len?")
    seconds = time.perf_counter() - start
    tokens_per_s = round((stats["train"]["tokens"] + stats["eval"]["tokens"]) / max(seconds, 1e-9))
    meta = {
        **stats,
        "sources": names,
        "formats": formats,
        "prompts": [vars(p) for p in prompts],
        "dropped": dict(tally.dropped),
        "truncated": dict(tally.truncated),
        "split": dict(tally.split),
        "notes": dict(tally.notes),
        "records": total_records,
        "prepare": {"seconds": round(seconds, 3), "tokens_per_s": tokens_per_s, "num_proc": num_proc},
        "identity": identity,
    }
    write_meta(folder, meta)
    return meta


def _eval_path_plan(cfg: DataConfig, sources: list[Source]) -> _SourcePlan:
    """``data.eval_path`` is read as one more source: the one source's own, or ``eval_path`` in a mixture."""
    own = sources[0] if len(sources) == 1 else None
    mapping, kwargs = field_mapping(cfg, None, "data"), template_kwargs(cfg, None, "data")
    source = Source(len(sources), EVAL_PATH_SOURCE, cfg.eval_path, cfg.format, cfg.split, None, None, 0.0, None, mapping, kwargs)
    if own is not None:
        source = replace(own, path=cfg.eval_path, weight=0.0, max_examples=None)
    # Under data.format=auto the eval file's format is detected from its own records.
    return _SourcePlan(resolve_format(source), count_records(cfg.eval_path, cfg.split), held_out=None, eval_only=True)


@dataclass
class _SourcePlan:
    source: Source
    records: int
    held_out: Optional[set]
    """Record indices split off for eval (None: none)."""
    eval_only: bool = False


def _plan_source(source: Source, cfg: DataConfig, seed: int) -> _SourcePlan:
    source = resolve_format(source)
    records = count_records(source.path, source.split)
    if source.max_examples is not None:
        records = min(records, source.max_examples)
    if records == 0:
        raise DataError(f"{source.path}: no records (source {source.name!r})")
    held = None if cfg.eval_path else _held_out(records, cfg.eval_fraction, seed + 7919 * source.index)
    return _SourcePlan(source, records, held)


def _held_out(num_records: int, fraction: float, seed: int) -> Optional[set]:
    """The record indices split off for eval: ``fraction`` of them, chosen by a seeded shuffle."""
    if fraction <= 0:
        return None
    order = list(range(num_records))
    random.Random(seed).shuffle(order)
    return set(order[: max(1, int(round(num_records * fraction)))])


Chunk = tuple[int, list[tuple[str, Payload]]]  # (plan index, [(split, payload)])


def _chunks(plans: list[_SourcePlan]) -> Iterator[Chunk]:
    """Each source's records in order, tagged train or eval, ``CHUNK_RECORDS`` at a time."""
    for k, plan in enumerate(plans):
        chunk: list[tuple[str, Payload]] = []
        for i, payload in enumerate(iter_payloads(plan.source.path, plan.source.split)):
            if i >= plan.records:
                break
            chunk.append(("eval" if plan.eval_only or (plan.held_out and i in plan.held_out) else "train", payload))
            if len(chunk) == CHUNK_RECORDS:
                yield k, chunk
                chunk = []
        if chunk:
            yield k, chunk


@dataclass
class _ChunkOut:
    plan: int
    records: int
    examples: dict[str, list[TokenizedExample]] = field(default_factory=lambda: {"train": [], "eval": []})
    packed: dict[str, PackedExamples] = field(default_factory=dict)
    """``examples`` as the store's arrays, made by the worker (the examples are not sent back)."""
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    split: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    eval_conversations: list[tuple[str, Conversation]] = field(default_factory=list)
    """Held-out chat conversations the template accepted, in order: the generation prompts are the first of them."""


class _ChunkWorker:
    """Parses, validates, renders and fits one chunk of records (in a worker process, or in place)."""

    def __init__(self, renderers: list[ChatRenderer], sources: list[Source], cfg: DataConfig):
        self.renderers = renderers
        self.sources = sources
        self.cfg = cfg

    def __call__(self, chunk: Chunk) -> _ChunkOut:
        k, items = chunk
        out = _ChunkOut(k, len(items))
        renderer = self.renderers[k]
        for split, payload in items:
            record = parse_payload(payload)
            try:
                conv = to_conversation(record, self.sources[k])
                examples = renderer.render_examples(conv, record.source, out.notes)
            except (InvalidRecord, ChatTemplateError) as e:
                if self.cfg.on_invalid == OnInvalid.error:
                    raise DataError(f"{e}; fix that record, or set data.on_invalid=skip to skip and count such records") from None
                reason = e.reason if isinstance(e, InvalidRecord) else TEMPLATE_REFUSED
                out.dropped[f"invalid: {reason}"] += 1
                continue
            if split == "eval" and not conv.is_plain and any(m["role"] == "assistant" for m in conv.messages):
                out.eval_conversations.append((record.source, conv))
            if len(examples) > 1:
                out.split[SPLIT_PER_TURN] += 1
            examples = document_windows(conv, examples, self.cfg.max_seq_len, out.truncated)
            for example in examples:
                fitted = _fit(example, renderer, self.cfg, out.dropped, out.truncated)
                if fitted is not None:
                    out.examples[split].append(fitted)
        out.packed = {split: pack_examples(examples) for split, examples in out.examples.items()}
        out.examples = {}
        return out


_WORKER: Optional[_ChunkWorker] = None


def _init_worker(worker: _ChunkWorker) -> None:
    global _WORKER
    _WORKER = worker


def _run_chunk(chunk: Chunk) -> _ChunkOut:
    assert _WORKER is not None
    return _WORKER(chunk)


def _map_in_order(worker: _ChunkWorker, chunks: Iterator[Chunk], num_proc: int) -> Iterator[_ChunkOut]:
    """``worker`` over ``chunks`` in ``num_proc`` processes, results in order, at most ``2 x num_proc`` chunks in
    flight (a pool that took the whole input at once would hold the corpus in memory)."""
    if num_proc <= 1:
        yield from map(worker, chunks)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(num_proc, initializer=_init_worker, initargs=(worker,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_run_chunk, chunk))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass
class _Tally:
    """What preparation dropped, truncated and split, counted per reason for the start-up log."""

    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    split: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)

    def add(self, out: _ChunkOut) -> None:
        self.dropped.update(out.dropped)
        self.truncated.update(out.truncated)
        self.split.update(out.split)
        self.notes.update(out.notes)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=" records", desc="preparing", disable=not enabled, mininterval=2.0, smoothing=0.1)


def _check_invalid_fraction(dropped: Counter, total: int, cfg: DataConfig) -> None:
    counts = {reason: n for reason, n in dropped.items() if reason.startswith("invalid: ")}
    invalid = sum(counts.values())
    if invalid > cfg.max_invalid_fraction * total:
        listed = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
        raise DataError(
            f"{invalid} of {total} records are invalid ({listed}), more than data.max_invalid_fraction="
            f"{cfg.max_invalid_fraction}; fix the data (data.on_invalid=error names the first bad line) or raise the limit"
        )


DOCUMENT_WINDOWS = "cut into max_seq_len windows (text documents longer than data.max_seq_len)"


def document_windows(conv: Conversation, examples: list[TokenizedExample], max_seq_len: int, truncated: Counter) -> list[TokenizedExample]:
    """A text document (a plain conversation trained throughout) longer than ``max_seq_len``, as consecutive windows
    of at most ``max_seq_len`` tokens instead of one over-length example (counted in ``truncated``); anything else as
    it is.

    Each window starts on the last token of the one before it, so every token of the document is a target exactly
    once (the first token of a window is only context). All windows but the last are marked truncated (their
    trained span ends at the cut, not at EOS).
    """
    if not conv.is_plain or not all(trained for _, trained in conv.segments or ()):
        return examples
    out = []
    for example in examples:
        n = len(example.input_ids)
        if n <= max_seq_len:
            out.append(example)
            continue
        truncated[DOCUMENT_WINDOWS] += 1
        starts = range(0, n - 1, max(1, max_seq_len - 1))
        for k, start in enumerate(starts, 1):
            end = min(start + max_seq_len, n)
            ids, labels = example.input_ids[start:end], example.labels[start:end]
            out.append(TokenizedExample(f"{example.source}#window{k}", ids, labels, None, end < n))
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


def _to_prompt(source: str, conversation: Conversation) -> GenerationPrompt:
    messages = conversation.messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    answer = messages[last]
    prompt = GenerationPrompt(source, messages[:last], answer["content"] or "")
    if conversation.tools or conversation.template_kwargs or answer.get("tool_calls"):
        prompt.tools, prompt.template_kwargs = conversation.tools, dict(conversation.template_kwargs)
        prompt.reference_tool_calls = answer.get("tool_calls")
    return prompt

"""Weighted mixtures of data sources: which sources a run reads, and which examples an epoch draws from each.

    data.sources='[{path: a.jsonl, weight: 2}, {path: b/, weight: 0.5, train_on: last_assistant}]'

A single ``data.path`` is a mixture of one source of weight 1. A source's weight is how many times each of its
examples is drawn per epoch: 2 trains every example twice, 0.5 a seeded half of them (the same half every epoch,
so the epoch and its packed rows are fixed for the run and a resume continues them), 0 none (the source is then
only evaluated). The draw is a pure function of the seed and the prepared store, so every rank and every resume
agrees on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from dtrain.config.schema import DataConfig, DataFormat, SourceConfig, TrainOn
from dtrain.errors import ConfigError

MAPPED_ROLES = ("system", "user", "assistant", "tool", "function_call", "observation")
"""What ``roles`` may map a data set's role names to (function_call/observation: ShareGPT's tool turns)."""

TEMPLATE_OWN_ARGUMENTS = ("conversation", "messages", "tools", "documents", "chat_template", "tokenize", "add_generation_prompt")
TEMPLATE_OWN_ARGUMENTS += ("continue_final_message", "return_dict", "return_tensors", "padding", "truncation", "max_length")
"""``apply_chat_template`` arguments dtrain sets itself: not settable through ``chat_template_kwargs``."""


@dataclass(frozen=True)
class FieldMapping:
    """Where a source's records keep their conversation (``data.messages_field``, ``role_key``, ``content_key``,
    ``roles``); None: the format's own name."""

    messages_field: Optional[str] = None
    role_key: Optional[str] = None
    content_key: Optional[str] = None
    roles: tuple[tuple[str, str], ...] = ()
    """The data's role names to dtrain's, as pairs (added to the format's own map)."""

    @property
    def is_set(self) -> bool:
        return bool(self.messages_field or self.role_key or self.content_key or self.roles)


@dataclass(frozen=True)
class Source:
    """One source as it is read: ``data.sources[i]`` with the unset fields filled from ``data``."""

    index: int
    name: str
    path: str
    format: DataFormat
    split: str
    train_on: Optional[TrainOn]
    """The source's own masking; None masks as the run does (``data.train_on``)."""
    chat_template: Optional[str]
    """The source's own template; None renders with the run's (``data.chat_template`` or the tokenizer's)."""
    weight: float
    max_examples: Optional[int]
    mapping: FieldMapping = FieldMapping()
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Default ``chat_template_kwargs`` of its records (a record's own win key by key)."""
    format_detected: bool = False
    """``format`` was detected from the records' fields (``data.format=auto``), not named."""


EVAL_PATH_SOURCE = "eval_path"
"""The name of ``data.eval_path``'s examples in a mixture of several sources (one source: that source's name)."""


def data_sources(cfg: DataConfig) -> list[Source]:
    """The sources of ``cfg``: ``data.sources``, or ``data.path`` as a mixture of one.

    Raises:
        ConfigError: Neither or both of ``data.path`` and ``data.sources`` set, a negative weight, no source with
            a positive weight, a non-positive ``max_examples``, two sources of the same name.
    """
    if bool(cfg.path) == bool(cfg.sources):
        raise ConfigError(
            "set exactly one of data.path (one file, folder or hub dataset) and data.sources (a weighted mixture); "
            f"got path={cfg.path!r} and {len(cfg.sources)} source(s)"
        )
    if cfg.path:
        mapping, kwargs = field_mapping(cfg, None, "data"), template_kwargs(cfg, None, "data")
        return [Source(0, _default_name(cfg.path), cfg.path, cfg.format, cfg.split, None, None, 1.0, None, mapping, kwargs)]
    sources = []
    for i, s in enumerate(cfg.sources):
        where = f"data.sources[{i}] ({s.path})"
        mapping, kwargs = field_mapping(cfg, s, where), template_kwargs(cfg, s, where)
        if s.weight < 0:
            raise ConfigError(f"{where}: weight={s.weight} is negative; use 0 to evaluate a source without training on it")
        if s.max_examples is not None and s.max_examples <= 0:
            raise ConfigError(f"{where}: max_examples={s.max_examples} must be positive (or null for all)")
        sources.append(
            Source(
                i,
                s.name or _default_name(s.path),
                s.path,
                s.format or cfg.format,
                s.split or cfg.split,
                s.train_on,
                s.chat_template,
                float(s.weight),
                s.max_examples,
                mapping,
                kwargs,
            )
        )
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"data.sources: the name(s) {repeated} are used twice; give each source a distinct name: field")
    if not any(s.weight > 0 for s in sources):
        raise ConfigError("data.sources: every weight is 0, so nothing would be trained")
    return sources


def field_mapping(cfg: DataConfig, source: Optional[SourceConfig], where: str) -> FieldMapping:
    """The mapping of ``source`` (its own keys, else ``data``'s), checked.

    Raises:
        ConfigError: A role mapped to something dtrain does not read, or an empty field name.
    """

    def pick(key: str):
        own = getattr(source, key) if source is not None else None
        return own if own is not None else getattr(cfg, key)

    names = {key: pick(key) for key in ("messages_field", "role_key", "content_key")}
    for key, name in names.items():
        if name is not None and not name.strip():
            raise ConfigError(f"{where}: {key} is empty; name the record field (or leave it unset for the format's own)")
    roles = dict(pick("roles") or {})
    wrong = {k: v for k, v in roles.items() if v not in MAPPED_ROLES}
    if wrong:
        raise ConfigError(f"{where}: roles maps to {wrong}, which dtrain does not read; map each role name to one of {MAPPED_ROLES}")
    return FieldMapping(**names, roles=tuple(sorted(roles.items())))


def template_kwargs(cfg: DataConfig, source: Optional[SourceConfig], where: str) -> dict[str, Any]:
    """The default ``chat_template_kwargs`` of ``source`` (its own, else ``data``'s), checked.

    Raises:
        ConfigError: A key that dtrain passes to the template itself (``tools``, ``add_generation_prompt``, ...).
    """
    own = source.chat_template_kwargs if source is not None else None
    kwargs = dict(own if own is not None else cfg.chat_template_kwargs or {})
    reserved = sorted(set(kwargs) & set(TEMPLATE_OWN_ARGUMENTS))
    if reserved:
        raise ConfigError(f"{where}: chat_template_kwargs sets {reserved}, which dtrain passes to the template itself; remove them")
    return kwargs


def mixture_weights(cfg: DataConfig, source_names: Sequence[str]) -> list[float]:
    """The training weight of every source of a prepared store, by index (``data.eval_path``'s examples: 0)."""
    weights = [s.weight for s in data_sources(cfg)]
    return weights + [0.0] * (len(source_names) - len(weights))


def _default_name(path: str) -> str:
    p = Path(path.rstrip("/"))
    return p.stem if p.suffix else p.name


def epoch_examples(source_index: np.ndarray, weights: Sequence[float], seed: int) -> np.ndarray:
    """The indices of the examples an epoch draws, in store order: each source's examples ``floor(weight)`` times,
    plus a seeded ``frac(weight)`` share of them (rounded to whole examples).

    With every weight 1 this is every example once (``arange``), so a one-source run trains exactly as before
    mixtures existed.

    Args:
        source_index: The source of each prepared training example (``TokenStore.source_index``).
        weights: The weight of each source, by index.
        seed: ``train.seed``.
    """
    if all(w == 1.0 for w in weights):
        return np.arange(len(source_index))
    parts = []
    for s, weight in enumerate(weights):
        members = np.flatnonzero(np.asarray(source_index) == s)
        whole, share = divmod(weight, 1.0)
        parts += [members] * int(whole)
        extra = int(round(share * len(members)))
        if extra:
            rng = np.random.default_rng([seed, s])
            parts.append(np.sort(rng.choice(members, extra, replace=False)))
    drawn = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return np.sort(drawn, kind="stable")

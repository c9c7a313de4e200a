"""Turning raw records of each supported format into a validated list of chat messages."""

from __future__ import annotations

from typing import Any

from dtrain.config.schema import DataFormat
from dtrain.data.sources import InvalidRecord, RawRecord

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


def to_messages(record: RawRecord, fmt: DataFormat) -> list[Message]:
    """Convert one record to ``[{"role", "content"}, ...]`` and check its structure.

    Raises:
        InvalidRecord: naming ``record.source`` and what is wrong (missing field, bad role, no assistant turn, ...).
    """
    if record.error:
        reason, _, detail = record.error.partition(": ")
        raise InvalidRecord(record.source, reason, detail)
    if fmt == DataFormat.alpaca:
        messages = _alpaca_to_messages(record)
    else:
        messages = record.data.get("messages")
        if messages is None:
            raise InvalidRecord(record.source, "missing field 'messages'", "for instruction/input/output records use data.format=alpaca")
    _check_messages(record.source, messages)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _alpaca_to_messages(record: RawRecord) -> list[Message]:
    data = record.data
    for key in ("instruction", "output"):
        if key not in data:
            raise InvalidRecord(record.source, f"missing field {key!r}", "alpaca record")
    prompt = data["instruction"]
    extra = data.get("input") or ""
    if not isinstance(prompt, str) or not isinstance(extra, str):
        raise InvalidRecord(record.source, "non-string content", "alpaca 'instruction', 'input' and 'output' must be strings")
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages: list[Message] = []
    if isinstance(data.get("system"), str) and data["system"].strip():
        messages.append({"role": "system", "content": data["system"]})
    if not isinstance(data["output"], str):
        raise InvalidRecord(record.source, "non-string content", "alpaca 'output' must be a string")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": data["output"]}]
    return messages


def _check_messages(source: str, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRecord(source, "missing field 'messages'", "'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidRecord(source, "missing field 'role'/'content'", f"message {i}")
        if m["role"] not in ROLES:
            raise InvalidRecord(source, "unknown role", f"message {i} has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise InvalidRecord(source, "non-string content", f"message {i} content is {type(m['content']).__name__}")
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * len(turns)
    if turns != expected[: len(turns)]:
        raise InvalidRecord(
            source, "non-alternating roles", f"got {roles}; expected an optional system message, then user/assistant turns in alternation"
        )
    if "assistant" not in turns:
        raise InvalidRecord(source, "no assistant turn", "nothing would be trained")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise InvalidRecord(source, "empty assistant content", f"message {i}")

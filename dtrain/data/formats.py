"""Turning raw records of each supported format into a validated list of chat messages."""

from __future__ import annotations

from typing import Any

from dtrain.config.schema import DataFormat
from dtrain.data.sources import DataError, RawRecord

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


def to_messages(record: RawRecord, fmt: DataFormat) -> list[Message]:
    """Convert one record to ``[{"role", "content"}, ...]`` and check its structure.

    Raises:
        DataError: naming ``record.source`` and what is wrong (missing field, bad role, no assistant turn, ...).
    """
    if fmt == DataFormat.alpaca:
        messages = _alpaca_to_messages(record)
    else:
        messages = record.data.get("messages")
        if messages is None:
            raise DataError(f"{record.source}: no 'messages' field (data.format=messages); for instruction/input/output records use data.format=alpaca")
    _check_messages(record.source, messages)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _alpaca_to_messages(record: RawRecord) -> list[Message]:
    data = record.data
    for key in ("instruction", "output"):
        if key not in data:
            raise DataError(f"{record.source}: alpaca record lacks the {key!r} field")
    prompt = data["instruction"]
    extra = data.get("input") or ""
    if not isinstance(prompt, str) or not isinstance(extra, str):
        raise DataError(f"{record.source}: alpaca 'instruction' and 'input' must be strings")
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages: list[Message] = []
    if isinstance(data.get("system"), str) and data["system"].strip():
        messages.append({"role": "system", "content": data["system"]})
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": data["output"]}]
    return messages


def _check_messages(source: str, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{source}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{source}: message {i} has unknown role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise DataError(f"{source}: message {i} content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "system" and i != 0:
            raise DataError(f"{source}: message {i}: a system message may only come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{source}: conversation has no assistant turn, so nothing would be trained")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{source}: message {i}: empty assistant content")

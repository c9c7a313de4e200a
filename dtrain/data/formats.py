"""Turning raw records of each supported format into a validated conversation (``dtrain/data/conversation.py``)."""

from __future__ import annotations

import json
from typing import Any

from dtrain.config.schema import DataFormat
from dtrain.data.conversation import Conversation, Message
from dtrain.data.sources import InvalidRecord, RawRecord

ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "ipython")
MESSAGE_KEYS = ("tool_calls", "reasoning_content", "thinking", "tool_call_id", "name", "train")


def to_conversation(record: RawRecord, source) -> Conversation:
    """One record as a ``Conversation``: its messages (with tool calls, tool results, reasoning and ``train``
    flags), record-level ``tools`` and ``chat_template_kwargs``.

    Args:
        record: The raw record.
        source: The ``Source`` it was read from (its ``format``).

    Raises:
        InvalidRecord: naming ``record.source`` and what is wrong.
    """
    fmt = getattr(source, "format", source)
    messages = to_messages(record, fmt)
    data = record.data
    tools = data.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise InvalidRecord(record.source, "invalid tools", "'tools' is a string but not JSON") from None
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise InvalidRecord(record.source, "invalid tools", "'tools' must be a list of JSON schemas")
    kwargs = data.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise InvalidRecord(record.source, "invalid chat_template_kwargs", "'chat_template_kwargs' must be an object")
    return Conversation(messages, tools or None, dict(kwargs))


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
    return [_message(m) for m in messages]


def _message(m: dict) -> Message:
    """The message as the template receives it: role and content, and only the optional keys it has."""
    message = {"role": "tool" if m["role"] in TOOL_ROLES else m["role"], "content": m["content"]}
    message.update({k: m[k] for k in MESSAGE_KEYS if k in m})
    if isinstance(message["content"], (dict, list)):  # a JSON tool result
        message["content"] = json.dumps(message["content"], ensure_ascii=False)
    return message


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
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise InvalidRecord(source, "missing field 'role'/'content'", f"message {i}")
        m.setdefault("content", None)
        if m["role"] not in ROLES + TOOL_ROLES:
            raise InvalidRecord(source, "unknown role", f"message {i} has role {m['role']!r}; expected one of {ROLES + TOOL_ROLES}")
        _check_fields(source, i, m)
    roles = [m["role"] for m in messages]
    if any(r in TOOL_ROLES for r in roles) or any(m.get("tool_calls") for m in messages):
        _check_tool_order(source, messages)
    else:
        turns = roles[1:] if roles[0] == "system" else roles
        expected = ["user", "assistant"] * len(turns)
        if turns != expected[: len(turns)]:
            raise InvalidRecord(
                source,
                "non-alternating roles",
                f"got {roles}; expected an optional system message, then user/assistant turns in alternation",
            )
    if "assistant" not in roles and not any(m.get("train") is True for m in messages):
        raise InvalidRecord(source, "no assistant turn", "nothing would be trained")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m.get("tool_calls") and not m["content"].strip():
            raise InvalidRecord(source, "empty assistant content", f"message {i}")


def _check_fields(source: str, i: int, m: dict) -> None:
    content, calls = m["content"], m.get("tool_calls")
    if m["role"] in TOOL_ROLES and isinstance(content, (dict, list)):
        pass  # a JSON result, serialised for the template
    elif not isinstance(content, str) and not (content is None and calls):
        raise InvalidRecord(source, "non-string content", f"message {i} content is {type(content).__name__}")
    if calls is not None:
        if m["role"] != "assistant" or not isinstance(calls, list) or not calls:
            raise InvalidRecord(source, "invalid tool_calls", f"message {i}: 'tool_calls' must be a non-empty list on an assistant message")
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) or "arguments" not in function:
                raise InvalidRecord(source, "invalid tool_calls", f'message {i}: each call must be {{"function": {{"name", "arguments"}}}}')
            arguments = function["arguments"]
            if isinstance(arguments, str):
                try:
                    json.loads(arguments)
                except json.JSONDecodeError:
                    raise InvalidRecord(source, "invalid tool_calls", f"message {i}: arguments are a string but not JSON") from None
            elif not isinstance(arguments, dict):
                raise InvalidRecord(source, "invalid tool_calls", f"message {i}: arguments must be an object or a JSON string")
    for key in ("reasoning_content", "thinking"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise InvalidRecord(source, "non-string content", f"message {i}: {key!r} must be a string")
    if "train" in m and not isinstance(m["train"], bool):
        raise InvalidRecord(source, "invalid train flag", f"message {i}: 'train' must be true or false")


def _check_tool_order(source: str, messages: list[dict]) -> None:
    """A tool result answers a call: it follows an assistant message with tool_calls, or another tool result."""
    for i, m in enumerate(messages):
        if m["role"] in TOOL_ROLES:
            before = messages[i - 1] if i else None
            if before is None or not (before["role"] in TOOL_ROLES or before.get("tool_calls")):
                raise InvalidRecord(source, "tool message without a call", f"message {i} answers no tool call before it")

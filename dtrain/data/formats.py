"""Record shapes at the edge: each record is read once, by its source's format, into a ``Conversation``.

    data.format=auto (default)   # per source, from the fields of its first records; logged at start
    data.format=sharegpt data.roles='{bot: assistant}'
    data.messages_field=dialog data.role_key=speaker data.content_key=text data.roles='{agent: assistant}'

Formats (README, "Data formats"): ``messages`` (OpenAI chat, with ``tools``, ``tool_calls``, tool results,
``reasoning_content``), ``sharegpt`` (``conversations`` of ``from``/``value``, with ``function_call`` and
``observation`` turns and ``system``/``tools`` columns), ``prompt_completion`` (TRL: strings, or lists of messages),
``text`` and ``alpaca``. Turns of every chat shape are read and checked by ``dtrain/data/turns.py``, so equivalent
records of two shapes become the same conversation. Nothing here renders or tokenises.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Optional

from dtrain.config.schema import DataFormat
from dtrain.data.conversation import Conversation, Message
from dtrain.data.mixture import TEMPLATE_OWN_ARGUMENTS, FieldMapping, Source
from dtrain.data.sources import InvalidRecord, RawRecord, iter_payloads, parse_payload
from dtrain.data.turns import OPENAI_KEYS, SHAREGPT_KEYS, TurnKeys, read_messages
from dtrain.errors import DataError

__all__ = ["Message", "detect_format", "record_formats", "resolve_format", "to_conversation", "to_messages"]

DETECT_RECORDS = 100
"""Records ``data.format=auto`` reads at most, from the start of a source, to find one of a known shape."""

SHAPES = {
    DataFormat.messages: "messages",
    DataFormat.sharegpt: "conversations",
    DataFormat.prompt_completion: "prompt + completion",
    DataFormat.text: "text",
    DataFormat.alpaca: "instruction + output",
}
"""The fields that identify each format (for detection and its error messages)."""


def to_conversation(record: RawRecord, source: Source) -> Conversation:
    """Read one record of ``source`` (its format, field mapping and template arguments) into a checked conversation.

    Raises:
        InvalidRecord: naming ``record.source`` and what is wrong, with a short reason that ``data.on_invalid=skip``
            counts (missing field, unknown role, tool call that is not JSON, no assistant turn, ...).
    """
    if record.error:
        reason, _, detail = record.error.partition(": ")
        raise InvalidRecord(record.source, reason, detail)
    fmt = source.format
    if fmt == DataFormat.auto:  # a source not planned by the preparation (tests, tools): this record's own shape
        found = record_formats(record.data, source.mapping)
        if len(found) != 1:
            raise InvalidRecord(record.source, "unknown record shape", _shapes_detail(record.data, found))
        fmt = found[0]
    if fmt == DataFormat.text:
        return Conversation(segments=[(_string(record, "text", "empty text"), True)])
    if fmt == DataFormat.prompt_completion:
        return _prompt_completion(record, source)
    if fmt == DataFormat.alpaca:
        messages = read_messages(_alpaca_turns(record), OPENAI_KEYS, record.source)
    else:
        keys = turn_keys(fmt, source.mapping)
        if keys.field not in record.data:
            detail = _shapes_detail(record.data, record_formats(record.data, source.mapping))
            raise InvalidRecord(record.source, f"missing field {keys.field!r}", detail)
        turns = record.data[keys.field]
        system = record.data.get("system") if fmt == DataFormat.sharegpt else None
        if isinstance(system, str) and system.strip() and isinstance(turns, list):
            turns = [{keys.role: "system", keys.content: system}, *turns]
        messages = read_messages(turns, keys, record.source)
    return _chat(record, source, messages)


def to_messages(record: RawRecord, fmt: DataFormat) -> list[Message]:
    """The messages of one chat record of format ``fmt`` (``to_conversation`` without a source: tests and tools)."""
    return to_conversation(record, Source(0, "", "", fmt, "train", None, None, 1.0, None)).messages


def turn_keys(fmt: DataFormat, mapping: FieldMapping) -> TurnKeys:
    """Where records of ``fmt`` keep their turns, with a source's mapping applied."""
    base = SHAREGPT_KEYS if fmt == DataFormat.sharegpt else OPENAI_KEYS
    return TurnKeys(
        mapping.messages_field or base.field,
        mapping.role_key or base.role,
        mapping.content_key or base.content,
        {**base.roles, **dict(mapping.roles)},
    )


def _chat(record: RawRecord, source: Source, messages: list[Message]) -> Conversation:
    return Conversation(messages, _tools(record), _template_kwargs(record, source))


def _string(record: RawRecord, key: str, empty: str, allow_empty: bool = False) -> str:
    value = record.data.get(key)
    if value is None:
        detail = _shapes_detail(record.data, record_formats(record.data, FieldMapping()))
        raise InvalidRecord(record.source, f"missing field {key!r}", detail)
    if not isinstance(value, str):
        raise InvalidRecord(record.source, "non-string content", f"{key!r} is {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidRecord(record.source, empty, f"{key!r} is blank")
    return value


def _prompt_completion(record: RawRecord, source: Source) -> Conversation:
    """TRL's shape: strings (no chat template: the completion and EOS trained), or lists of messages (one chat, only
    the completion's assistant turns trained)."""
    data = record.data
    for key in ("prompt", "completion"):
        if data.get(key) is None:
            raise InvalidRecord(record.source, f"missing field {key!r}", "prompt/completion record")
    prompt, completion = data["prompt"], data["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        _string(record, "completion", "empty completion")
        return Conversation(segments=[(prompt, False), (completion, True)])
    if isinstance(prompt, list) and isinstance(completion, list):
        keys = turn_keys(DataFormat.messages, source.mapping)
        messages = read_messages([*prompt, *completion], replace(keys, field="prompt + completion"), record.source, len(prompt))
        return _chat(record, source, messages)
    raise InvalidRecord(
        record.source,
        "prompt and completion of different shapes",
        f"prompt is {type(prompt).__name__}, completion {type(completion).__name__}; both strings or both lists of messages",
    )


def _alpaca_turns(record: RawRecord) -> list[Message]:
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


def _tools(record: RawRecord) -> Optional[list[dict]]:
    """The record's tool schemas (a list, or a JSON string of one); None when it has none."""
    tools = record.data.get("tools")
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise InvalidRecord(record.source, "invalid tools", f"'tools' is a string but not JSON: {e.msg}") from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InvalidRecord(record.source, "invalid tools", "'tools' must be a list of JSON schemas (objects), or a JSON string of one")
    return tools


def _template_kwargs(record: RawRecord, source: Source) -> dict[str, Any]:
    """The source's default ``chat_template_kwargs`` with the record's own on top."""
    own = record.data.get("chat_template_kwargs")
    if own is None:
        return dict(source.template_kwargs)
    if not isinstance(own, dict):
        raise InvalidRecord(record.source, "invalid chat_template_kwargs", f"expected an object, got {type(own).__name__}")
    reserved = sorted(set(own) & set(TEMPLATE_OWN_ARGUMENTS))
    if reserved:
        raise InvalidRecord(record.source, "invalid chat_template_kwargs", f"{reserved} are set by dtrain itself")
    return {**source.template_kwargs, **own}


def record_formats(data: dict, mapping: FieldMapping) -> list[DataFormat]:
    """The formats whose identifying fields ``data`` has (a field holding null does not count).

    A source's ``messages_field`` names its conversation field: records holding it read as ``messages`` (with the
    source's role and content keys), and ``conversations`` then no longer means ShareGPT.
    """

    def has(*keys: str) -> bool:
        return all(data.get(k) is not None for k in keys)

    found = []
    if mapping.messages_field:
        found += [DataFormat.messages] if has(mapping.messages_field) else []
    else:
        found += [DataFormat.messages] if has("messages") else []
        found += [DataFormat.sharegpt] if has("conversations") else []
    found += [DataFormat.prompt_completion] if has("prompt", "completion") else []
    found += [DataFormat.text] if has("text") else []
    found += [DataFormat.alpaca] if has("instruction", "output") else []
    return found


def _shapes_detail(data: dict, found: list[DataFormat]) -> str:
    accepted = "; ".join(f"{fmt.value}: {fields}" for fmt, fields in SHAPES.items())
    if found:
        return f"the record has the fields {sorted(data)}, which fit {[f.value for f in found]}; set data.format"
    return f"the record has the fields {sorted(data)}; formats and their fields: {accepted} (other names: data.messages_field)"


def detect_format(source: Source) -> DataFormat:
    """The format of ``source``: that of the first of its records (among the first ``DETECT_RECORDS``) whose fields
    fit a known format. Records that fit none are passed over here (they are invalid records later).

    Raises:
        DataError: The first fitting record fits several formats, or none of the records read fits one; the error
            names the fields found and the formats accepted.
    """
    seen: set[str] = set()
    for i, payload in enumerate(iter_payloads(source.path, source.split)):
        if i >= DETECT_RECORDS:
            break
        record = parse_payload(payload)
        if record.error:
            continue
        found = record_formats(record.data, source.mapping)
        if len(found) == 1:
            return found[0]
        if found:
            raise DataError(
                f"source {source.name!r} ({source.path}): data.format=auto cannot tell the format: {record.source} has the "
                f"fields {sorted(record.data)}, which fit {[f.value for f in found]}; set the source's format to one of them"
            )
        seen.update(record.data)
    accepted = "; ".join(f"{fmt.value}: {fields}" for fmt, fields in SHAPES.items())
    raise DataError(
        f"source {source.name!r} ({source.path}): data.format=auto found no record of a known format among its first "
        f"{DETECT_RECORDS} (their fields: {sorted(seen)}); formats and the fields they need: {accepted}. Name the "
        "format, and for other field names map them: data.messages_field, data.role_key, data.content_key, data.roles"
    )


def resolve_format(source: Source) -> Source:
    """``source`` with its format named: detected from its records under ``data.format=auto``."""
    if source.format != DataFormat.auto:
        return source
    return replace(source, format=detect_format(source), format_detected=True)

"""What a chat template does with tool calls, tool results and reasoning, found from its own renderings.

Published templates disagree on the form of a call's ``arguments``: Qwen2.5, Llama-3.1 and Mistral serialise them
themselves (``arguments | tojson``), so a JSON string given to them comes out quoted inside quotes; DeepSeek-R1
concatenates them (``+ arguments``), so an object makes it raise. ``call_forms`` renders one probe call both ways
and keeps the form the template writes as JSON. Some templates also leave out what they were given without a
word (Granite-3.0 renders neither tool calls nor the ``tool`` role; DeepSeek-R1-distill drops a call whose message
has content; many ignore ``reasoning_content``): ``dropped_parts`` and ``reasoning_ignored`` read that from the
rendered text, never from a list of template names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from dtrain.data.conversation import Message
from dtrain.data.template_text import ChatTemplateError, Renders, common_prefix_length, find_content

OBJECT, STRING, AS_GIVEN = "object", "string", "as_given"

_PROBE_ARGS = {"dtrain_probe_key": "dtrain probe value"}


@dataclass(frozen=True)
class CallForms:
    """How one template wants tool calls given (``call_forms``).

    Attributes:
        arguments: ``OBJECT`` (it serialises them: a string would be re-encoded), ``STRING`` (it concatenates them:
            an object raises or is written as a Python dict) or ``AS_GIVEN`` (it writes both forms as JSON, or no call).
        null_content: What a tool-call turn without text gets as content: None, or "" for a template that reads the
            content unconditionally (transformers drops None-valued keys, and Qwen3 then fails on the missing key).
    """

    arguments: str
    null_content: Optional[str]


def call_forms(tokenizer) -> CallForms:
    """Render one probe call in each form and keep those the template writes as JSON without failing."""
    renders = {(a, c): _render_probe(tokenizer, a, c) for a in (OBJECT, STRING) for c in (None, "")}
    name = "dtrain_probe"
    null_content = None if any(name in (renders[a, None] or "") for a in (OBJECT, STRING)) else ""
    if null_content == "" and renders[OBJECT, ""] is None and renders[STRING, ""] is None:
        null_content = None  # it fails either way: let the record name the template's own message
    as_object, as_string = renders[OBJECT, null_content], renders[STRING, null_content]
    key = '"dtrain_probe_key"'
    object_ok = as_object is not None and key in as_object
    string_ok = as_string is not None and key in as_string and json.dumps(key)[1:-1] not in as_string
    form = OBJECT if object_ok and not string_ok else STRING if string_ok and not object_ok else AS_GIVEN
    return CallForms(form, null_content)


def _render_probe(tokenizer, form: str, content: Optional[str]) -> Optional[str]:
    arguments = dict(_PROBE_ARGS) if form == OBJECT else json.dumps(_PROBE_ARGS)
    call = {"id": "dtrain001", "type": "function", "function": {"name": "dtrain_probe", "arguments": arguments}}
    messages = [{"role": "user", "content": "probe"}, {"role": "assistant", "content": content, "tool_calls": [call]}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template refuses a probe in many ways (raise_exception, TypeError, undefined keys)
        return None


def template_messages(messages: list[Message], forms: CallForms) -> list[Message]:
    """The messages as the template receives them: ``train`` flags removed, tool calls in the template's forms."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if k != "train"}
        if m.get("tool_calls"):
            if forms.arguments != AS_GIVEN:
                m["tool_calls"] = [_with_form(call, forms.arguments) for call in m["tool_calls"]]
            if m.get("content") is None:
                m["content"] = forms.null_content
        out.append(m)
    return out


def _with_form(call: dict, form: str) -> dict:
    function = dict(call["function"])
    arguments = function["arguments"]
    if form == OBJECT and isinstance(arguments, str):
        function["arguments"] = json.loads(arguments)
    elif form == STRING and not isinstance(arguments, str):
        function["arguments"] = json.dumps(arguments, ensure_ascii=False)
    return {**call, "function": function}


def dropped_parts(renders: Renders, text: str) -> list[str]:
    """What ``text`` (the render of the whole conversation) leaves out: each tool call whose name or argument values
    are missing after its turn starts, the text content of a tool-call turn, each non-empty tool result."""
    missing: list[str] = []
    lo = 0
    for i, m in enumerate(renders.messages):
        if m["role"] == "assistant" and m.get("tool_calls"):  # (a plain chat costs no prefix comparison here)
            lo = _header(renders, text, i)
            for call in m["tool_calls"]:
                function = call["function"]
                at = text.find(function["name"], lo)
                if at < 0 or not all(_has_value(text, at, v) for v in _leaves(function["arguments"])):
                    missing.append(f"the call to {function['name']!r} in message {i}")
            content = m.get("content")
            if content and content.strip() and find_content(text, lo, content) is None:
                missing.append(f"the content of message {i}")
        elif m["role"] == "tool" and m.get("content") and find_content(text, lo, m["content"]) is None:
            missing.append(f"the result in tool message {i}")
    return missing


def _header(renders: Renders, text: str, i: int) -> int:
    try:
        return common_prefix_length(renders(i), text) if i else 0
    except ChatTemplateError:  # a prefix the template refuses on its own
        return 0


def _leaves(arguments) -> list:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return [arguments]
    out: list = []
    stack = [arguments]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            out += list(value)
            stack += list(value.values())
        elif isinstance(value, list):
            stack += value
        elif value is not None:
            out.append(value)
    return out


def _has_value(text: str, lo: int, value) -> bool:
    if isinstance(value, str):
        forms = (value, json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(value)[1:-1])
    else:
        forms = (json.dumps(value), str(value))
    return any(text.find(form, lo) >= 0 for form in forms)


def reasoning_ignored(renders: Renders, i: int) -> bool:
    """Whether assistant message ``i`` gives reasoning (``reasoning_content`` or ``thinking``) that the render ending
    with it does not write."""
    m = renders.messages[i]
    reasoning = m.get("reasoning_content") or m.get("thinking")
    if not isinstance(reasoning, str) or not reasoning.strip():
        return False
    own = renders(i + 1)
    return find_content(own, _header(renders, own, i), reasoning) is None

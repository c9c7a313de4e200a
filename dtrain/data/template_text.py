"""Where each assistant turn sits in the text a chat template renders, found by rendering prefixes of the conversation.

Everything here is character offsets in rendered text, never tokens: the render of the messages before a turn, with
and without the generation prompt, says where the turn starts and where the model's part of it starts; the turn's
content is then found in the text as the template writes it (some templates trim it or drop a ``<think>`` block),
and the end-of-turn token must follow it. Tokenisation comes later (``dtrain/data/pieces.py``), cut at these offsets.

A template that raises (Gemma-2 refusing a system message, Mistral's role-alternation check) surfaces as
``ChatTemplateError`` naming the record and the template's own message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Optional

import jinja2

from dtrain.data.conversation import Message
from dtrain.errors import DataError


class ChatTemplateError(DataError):
    """The chat template refused one conversation (its ``raise_exception`` or a Jinja error): a bad record."""

    def __init__(self, source: str, detail: str):
        super().__init__(f"{source}: the chat template refused this conversation: {detail}")
        self.source, self.detail = source, detail

    def __reduce__(self):  # the worker processes that render send it back pickled
        return (ChatTemplateError, (self.source, self.detail))


class TemplateRewrites(Exception):
    """The template renders a turn differently once later turns follow it (Qwen3 drops earlier ``<think>`` blocks)."""


@dataclass(frozen=True)
class Turn:
    """Character offsets of one trained turn (an assistant turn, or a message with ``train: true``) in a rendered
    conversation."""

    header: int  # end of the render of the messages before it: its role header starts here
    start: int  # end of its generation prompt: the first character the model has to produce
    content: tuple[int, int]  # the content as the template wrote it (empty where the turn is found by prefix renders)
    closing: Optional[tuple[int, int]]  # the end-of-turn token after the content (None: the template writes none)
    after: str  # what the template writes right after the content (for error messages)


class Renders:
    """Renders of the first ``n`` messages of one conversation, each computed once.

    Args:
        tokenizer: The tokenizer whose chat template renders.
        messages: The conversation, as the template receives it.
        source: ``file:line`` of the record, for errors.
        tools: The record's tool schemas (``tools=``), or None.
        template_kwargs: Extra template arguments (``chat_template_kwargs``).
    """

    def __init__(self, tokenizer, messages: list[Message], source: str, tools: Optional[list] = None, template_kwargs=None):
        self.tokenizer, self.messages, self.source = tokenizer, messages, source
        self.tools, self.template_kwargs = tools, template_kwargs or {}
        self._cache: dict[tuple[int, bool], str] = {}
        self._prefix_render: Optional[Callable[[int, bool], str]] = None
        self._checked = False

    def __call__(self, n: int, generation_prompt: bool = False) -> str:
        """The text of ``messages[:n]``, with the assistant generation prompt appended if asked.

        Raises:
            ChatTemplateError: when the template raises for this conversation.
            DataError: when the template does not compile.
        """
        key = (n, generation_prompt)
        if key == (0, False):  # what comes before the first message (transformers refuses to render no messages)
            return ""
        if key not in self._cache:
            self._cache[key] = self._guarded(lambda: self._render(n, generation_prompt))
        return self._cache[key]

    def _render(self, n: int, generation_prompt: bool) -> str:
        """One render. The first one takes the whole conversation through ``apply_chat_template`` and through the
        compiled template with the conversation prepared once (``_prefix_renderer``); when the two agree, every
        later prefix takes the second way (about half the time a render costs, most of it transformers' copying
        the messages and tool schemas again for each prefix), else the first."""
        if not self._checked:
            self._checked = True
            full = len(self.messages)
            try:
                official = self._apply_chat_template(full, False)
                fast = _prefix_renderer(self.tokenizer, self.messages, self.tools, self.template_kwargs)
                if fast is not None and fast(full, False) == official:
                    self._prefix_render = fast
            except RENDER_ERRORS:  # the template refuses the whole: each render goes its own way and raises as it does
                official = None
            if official is not None:
                self._cache[(full, False)] = official
                if (n, generation_prompt) == (full, False):
                    return official
        if self._prefix_render is not None:
            return self._prefix_render(n, generation_prompt)
        return self._apply_chat_template(n, generation_prompt)

    def _apply_chat_template(self, n: int, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            self.messages[:n], tools=self.tools, tokenize=False, add_generation_prompt=generation_prompt, **self.template_kwargs
        )

    def _guarded(self, render: Callable[[], str]) -> str:
        try:
            return render()
        except jinja2.TemplateSyntaxError as e:  # every record would fail the same way: a config error, not a record's
            raise DataError(f"the chat template does not compile: {e} (line {e.lineno}); check data.chat_template") from None
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, or an undefined variable
            raise ChatTemplateError(self.source, str(e)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(self.source, f"{type(e).__name__}: {e}") from None


RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)
"""What a chat template raises for a conversation it refuses (``Renders._guarded`` says which it was)."""


def _prefix_renderer(tokenizer, messages: list[Message], tools: Optional[list], template_kwargs: dict):
    """``(n, generation_prompt) -> text`` of ``messages[:n]`` as ``apply_chat_template(tokenize=False)`` renders it,
    with transformers' preparation of the inputs (keys holding None dropped, plain-data copies, reasoning aliases,
    special tokens as template variables) done once for the conversation instead of once per prefix.

    None where transformers' helpers are not there (another version); ``Renders`` also checks the whole
    conversation's render against ``apply_chat_template`` before using this for its prefixes.
    """
    try:
        from transformers.utils.chat_template_utils import (
            _alias_reasoning_fields,
            _compile_jinja_template,
            _normalize_chat_messages,
            _plain_template_data,
        )
    except ImportError:
        return None
    if tools is not None and not all(isinstance(tool, dict) for tool in tools):
        return None  # functions as tools: transformers converts them to schemas; not worth doing twice
    template = _compile_jinja_template(tokenizer.get_chat_template(None, tools))
    chat = _alias_reasoning_fields(_plain_template_data(_normalize_chat_messages(messages)))
    schemas = _plain_template_data(tools)
    variables = _plain_template_data({**tokenizer.special_tokens_map, **template_kwargs})

    def render(n: int, generation_prompt: bool) -> str:
        # The sandbox is immutable: a render cannot change the shared prepared messages for the next one.
        return template.render(messages=chat[:n], tools=schemas, documents=None, add_generation_prompt=generation_prompt, **variables)

    return render


def content_variants(content: str) -> list[str]:
    """The forms a published template writes a message's content in, most faithful first.

    Gemma and Llama-3 ``trim`` it, Llama-2 ``strip()``s it, Qwen3 ``lstrip('\\n')``s it, and the reasoning templates
    (Qwen3, DeepSeek-R1) keep only what follows ``</think>`` in turns before the last; last, the content
    JSON-escaped, as a template that serialises it writes it.
    """
    if not content:
        return []
    tails = [content]
    if "</think>" in content:
        tails.append(content.split("</think>")[-1])
    variants: list[str] = []
    for tail in tails:
        for variant in (tail, tail.strip(), tail.lstrip("\n"), tail.lstrip(), tail.rstrip()):
            if variant not in variants:
                variants.append(variant)
    escaped = json.dumps(content, ensure_ascii=False)[1:-1]  # Llama-3.1 writes a tool result as a JSON string
    if escaped not in variants:
        variants.append(escaped)
    return variants


def find_content(text: str, lo: int, content: str) -> Optional[tuple[int, int]]:
    """The first place at or after ``lo`` where ``text`` holds a form of ``content`` (None if it holds none)."""
    for variant in content_variants(content):
        at = text.find(variant, lo) if variant else -1
        if at >= 0:
            return at, at + len(variant)
    return None


def common_prefix_length(a: str, b: str) -> int:
    """How many leading characters ``a`` and ``b`` share."""
    # Slice comparisons (in C), halving the unsure span: a character loop in Python took a sixth of preparing a
    # tool-calling corpus, where every render repeats the tool prompt (bench/corpus.py --shapes).
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def locate_turn(renders: Renders, text: str, index: int, end_of_turn: str) -> Turn:
    """Offsets of message ``index`` (an assistant turn, or a message trained by its ``train`` flag) in ``text``.

    ``text`` is a render of a conversation that contains the message. The turn starts where the render of the
    messages before it ends (less what a template writes only at the end of a render: Phi-3.5's end-of-text token);
    the model's part starts where the generation prompt ends (or where it stops matching ``text``: DeepSeek-R1's
    prompt ends in ``<think>\\n``, which its rendered history drops). An assistant turn with text content ends at
    the end-of-turn token that follows the first form of its content (see ``content_variants``), allowing whitespace
    in between (Llama-2 writes ``" </s>"``). A turn with no content to find (tool calls with null or empty content),
    and a user turn, end at the end-of-turn token that closes what the turn adds to the render (``_closing_by_prefix``).

    Raises:
        TemplateRewrites: if ``text`` does not begin with the messages before the turn as the prompt renders them, or
            the turn renders differently once later turns follow it.
        DataError: if the content cannot be found in ``text`` at all.
    """
    head = renders(index)
    header = common_prefix_length(head, text)
    message = renders.messages[index]
    ends_every_render = renders(index + 1).endswith(head[header:])
    assistant = message["role"] == "assistant"
    start = common_prefix_length(renders(index, generation_prompt=True), text) if assistant else header
    if start < header or not ends_every_render:
        raise TemplateRewrites(
            f"the prompt of message {index} renders as {head[header : header + 40]!r}... where the conversation "
            f"that contains the answer has {text[header : header + 40]!r}..."
        )
    content = message["content"]
    if assistant and content and not message.get("tool_calls"):
        found, closing = _find_closed_content(text, header, start, content, end_of_turn)
        if found is None:
            raise DataError(
                f"{renders.source}: the content of assistant message {index} is not in the text the chat template renders "
                "(the template rewrites it in a way dtrain does not recognise), so its loss mask cannot be placed"
            )
        start = min(start, found[0])  # a prompt that runs into the answer's first characters still ends before it
    else:
        if not assistant:  # a user turn trained by its flag: from its content (not the role header) on
            found = find_content(text, header, content) if content else None
            start = found[0] if found else header
        closing = _closing_by_prefix(renders, text, index, start, end_of_turn)
        found = (start, start)
    return Turn(header, start, found, closing, text[found[1] : found[1] + 30])


def _closing_by_prefix(renders: Renders, text: str, index: int, start: int, end_of_turn: str) -> Optional[tuple[int, int]]:
    """The end-of-turn token that closes message ``index``: the last one the render ending with that message writes
    after ``start`` (None: it writes none), where ``text`` must agree with that render.

    Raises:
        TemplateRewrites: ``text`` writes the turn otherwise than the render that ends with it (Qwen3 writes an empty
            ``<think>`` block only into the last assistant turn after the last user message).
    """
    own = renders(index + 1)
    # ``text`` holds the turn where ``own`` does, or is the turn's prompt followed by the end of ``own``
    # (``ChatRenderer._inference_text``): then offsets in ``own`` are ``shift`` past those in ``text``.
    shift = len(own) - len(text) if own.endswith(text[start:]) and len(own) != len(text) else 0
    at = own.rfind(end_of_turn, start + shift)
    if at < 0:
        return None
    end = at + len(end_of_turn)
    if own[start + shift : end] != text[start : end - shift]:
        agreed = common_prefix_length(own, text)
        raise TemplateRewrites(
            f"message {index} renders as {own[agreed : agreed + 40]!r}... when it ends the conversation, and as "
            f"{text[agreed : agreed + 40]!r}... once later turns follow"
        )
    return at - shift, end - shift


def message_strings(message: Message) -> list[str]:
    """The texts a message gives the template: content, reasoning, and each call's name and argument strings."""
    out = [message.get(k) for k in ("content", "reasoning_content", "thinking")]
    for call in message.get("tool_calls") or ():
        function = call.get("function", call) if isinstance(call, dict) else {}
        out.append(function.get("name"))
        out += _json_strings(function.get("arguments"))
    return [s for s in out if isinstance(s, str) and s]


def _json_strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_json_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _json_strings(v)]
    return []


def message_text_spans(text: str, lo: int, hi: int, message: Message, spells_special) -> list[tuple[int, int]]:
    """Where, in ``text[lo:hi]``, the message's own strings sit, for those that spell a special token
    (``spells_special``): the tokeniser must read them as text. A string rendered JSON-escaped is found in that form."""
    spans = []
    for string in message_strings(message):
        if not spells_special(string):
            continue
        for form in (string, json.dumps(string, ensure_ascii=False)[1:-1]):
            at = text.find(form, lo, hi)
            if at >= 0:
                spans.append((at, at + len(form)))
                break
    return spans


def _find_closed_content(text: str, lo: int, start: int, content: str, end_of_turn: str):
    """(content span, end-of-turn span) of the first content form that the end-of-turn token follows.

    Falls back to the first form found at all, with no closing span (the caller reports it).
    """
    closing_re = re.compile(r"\s*(" + re.escape(end_of_turn) + ")")
    first = None
    for variant in content_variants(content):
        # An empty form (the turn was only a <think> block the template dropped) sits where the prompt ends.
        at = text.find(variant, lo) if variant else start
        while at >= 0:
            end = at + len(variant)
            match = closing_re.match(text, end)
            if match:
                return (at, end), match.span(1)
            first = first or (at, end)
            at = text.find(variant, at + 1) if variant else -1
    return first, None

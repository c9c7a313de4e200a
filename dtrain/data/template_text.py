"""Where each assistant turn sits in the text a chat template renders, found by rendering prefixes of the conversation.

Everything here is character offsets in rendered text, never tokens: the render of the messages before a turn, with
and without the generation prompt, says where the turn starts and where the model's part of it starts; the turn's
content is then found in the text as the template writes it (some templates trim it or drop a ``<think>`` block),
and the end-of-turn token must follow it. Tokenisation comes later (``dtrain/data/pieces.py``), cut at these offsets.

A template that raises (Gemma-2 refusing a system message, Mistral's role-alternation check) surfaces as
``ChatTemplateError`` naming the record and the template's own message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import jinja2

from dtrain.data.formats import Message
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
    """Character offsets of one assistant turn in a rendered conversation."""

    header: int  # end of the render of the messages before it: its role header starts here
    start: int  # end of its generation prompt: the first character the model has to produce
    content: tuple[int, int]  # the content as the template wrote it
    closing: Optional[tuple[int, int]]  # the end-of-turn token after the content (None: the template writes none)
    after: str  # what the template writes right after the content (for error messages)


class Renders:
    """Renders of the first ``n`` messages of one conversation, each computed once.

    Args:
        tokenizer: The tokenizer whose chat template renders.
        messages: The conversation.
        source: ``file:line`` of the record, for errors.
    """

    def __init__(self, tokenizer, messages: list[Message], source: str):
        self.tokenizer, self.messages, self.source = tokenizer, messages, source
        self._cache: dict[tuple[int, bool], str] = {}

    def __call__(self, n: int, generation_prompt: bool = False) -> str:
        """The text of ``messages[:n]``, with the assistant generation prompt appended if asked.

        Raises:
            ChatTemplateError: when the template raises for this conversation.
            DataError: when the template does not compile.
        """
        key = (n, generation_prompt)
        if key not in self._cache:
            self._cache[key] = self._render(self.messages[:n], generation_prompt)
        return self._cache[key]

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except jinja2.TemplateSyntaxError as e:  # every record would fail the same way: a config error, not a record's
            raise DataError(f"the chat template does not compile: {e} (line {e.lineno}); check data.chat_template") from None
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, or an undefined variable
            raise ChatTemplateError(self.source, str(e)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(self.source, f"{type(e).__name__}: {e}") from None


def content_variants(content: str) -> list[str]:
    """The forms a published template writes a message's content in, most faithful first.

    Gemma and Llama-3 ``trim`` it, Llama-2 ``strip()``s it, Qwen3 ``lstrip('\\n')``s it, and the reasoning templates
    (Qwen3, DeepSeek-R1) keep only what follows ``</think>`` in turns before the last.
    """
    tails = [content]
    if "</think>" in content:
        tails.append(content.split("</think>")[-1])
    variants: list[str] = []
    for tail in tails:
        for variant in (tail, tail.strip(), tail.lstrip("\n"), tail.lstrip(), tail.rstrip()):
            if variant not in variants:
                variants.append(variant)
    return variants


def find_content(text: str, lo: int, content: str) -> Optional[tuple[int, int]]:
    """The first place at or after ``lo`` where ``text`` holds a form of ``content`` (None if it holds none)."""
    for variant in content_variants(content):
        at = text.find(variant, lo) if variant else -1
        if at >= 0:
            return at, at + len(variant)
    return None


def common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def locate_turn(renders: Renders, text: str, index: int, end_of_turn: str) -> Turn:
    """Offsets of assistant message ``index`` in ``text`` (a render of a conversation that contains it).

    The turn starts where the render of the messages before it ends (less what a template writes only at the end
    of a render: Phi-3.5's end-of-text token); the model's part starts where the generation prompt ends (or where it
    stops matching ``text``: DeepSeek-R1's prompt ends in ``<think>\\n``, which its rendered history drops); the
    content is the first form of it (see ``content_variants``) that the end-of-turn token follows, allowing
    whitespace in between (Llama-2 writes ``" </s>"``).

    Raises:
        TemplateRewrites: if ``text`` does not begin with the messages before the turn as the prompt renders them.
        DataError: if the content cannot be found in ``text`` at all.
    """
    head = renders(index)
    header = common_prefix_length(head, text)
    start = common_prefix_length(renders(index, generation_prompt=True), text)
    ends_every_render = renders(index + 1).endswith(head[header:])
    if start < header or not ends_every_render:
        raise TemplateRewrites(
            f"the prompt of assistant message {index} renders as {head[header : header + 40]!r}... where the conversation "
            f"that contains the answer has {text[header : header + 40]!r}..."
        )
    content, closing = _find_closed_content(text, header, start, renders.messages[index]["content"], end_of_turn)
    if content is None:
        raise DataError(
            f"{renders.source}: the content of assistant message {index} is not in the text the chat template renders "
            "(the template rewrites it in a way dtrain does not recognise), so its loss mask cannot be placed"
        )
    start = min(start, content[0])  # a prompt that runs into the answer's first characters still ends before it
    return Turn(header, start, content, closing, text[content[1] : content[1] + 30])


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

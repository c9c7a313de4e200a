"""Rendering conversations through the chat template, with labels taken from the message structure.

The trained span of an assistant turn runs from the end of its generation prompt (the render of the messages before
it with ``add_generation_prompt``) through the end-of-turn token that closes its content: what the model has to
produce at inference. Both ends come from renders of prefixes of the conversation, compared as text
(``dtrain/data/template_text.py``); the text is then tokenised in pieces cut at those ends, with message content
read as text, never as special tokens (``dtrain/data/pieces.py``). Nothing searches the token stream for a template
string, and padding is never identified by token id, so a tokenizer whose pad token equals its EOS token still
trains the EOS that ends each answer.

A template that renders earlier turns differently once later turns follow (Qwen3 drops their ``<think>`` blocks,
and writes an empty one only into the last turn of a tool chain) cannot give one example whose every turn is
rendered as the model saw it: under ``train_on=assistant`` such a conversation becomes one example per assistant
turn, each the conversation up to and including that turn (``render_examples``), and the caller counts it.

Tool calling: record-level ``tools`` and ``chat_template_kwargs`` go to the template; an assistant turn with tool
calls (content null, empty or text) is trained from its generation prompt through the end-of-turn token that closes
it, found from prefix renders (``template_text.locate_turn``); tool results, like system and user messages, are
never trained unless a message's ``train`` flag says so. A conversation the template cannot represent (it leaves out
a call or a result, or moves part of the conversation once the answer follows) is an invalid record
(``TemplateCannotRender``), skipped and counted under ``data.on_invalid=skip``. Plain conversations (text records)
are tokenised without a template, followed by the tokenizer's EOS token.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from dtrain.config.schema import TrainOn
from dtrain.data.conversation import Conversation, Message
from dtrain.data.pieces import Encoded, PieceEncoder
from dtrain.data.sources import InvalidRecord
from dtrain.data.template_checks import CallForms, call_forms, dropped_parts, reasoning_ignored, template_messages
from dtrain.data.template_text import (
    ChatTemplateError,
    Renders,
    TemplateRewrites,
    Turn,
    common_prefix_length,
    find_content,
    locate_turn,
    message_strings,
    message_text_spans,
)
from dtrain.errors import DataError

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "ChatRenderer",
    "ChatTemplateError",
    "TemplateCannotRender",
    "TokenizedExample",
    "as_conversation",
    "resolve_chat_template",
]

TEMPLATE_DROPS = "the chat template leaves out part of it"
TEMPLATE_MOVES = "the chat template moves part of it once the answer follows"
REASONING_IGNORED = "whose reasoning (reasoning_content/thinking) the chat template does not render; the answers still train"


class TemplateCannotRender(InvalidRecord):
    """A conversation the chat template cannot represent as the model sees it: a bad record for this template
    (``reason`` is ``TEMPLATE_DROPS`` or ``TEMPLATE_MOVES``), skipped and counted under ``data.on_invalid=skip``."""

    def __reduce__(self):  # the worker processes that render send it back pickled
        return (_rebuild_cannot_render, (str(self), self.source, self.reason))


def _rebuild_cannot_render(message: str, source: str, reason: str) -> TemplateCannotRender:
    error = TemplateCannotRender.__new__(TemplateCannotRender)
    DataError.__init__(error, message)
    error.source, error.reason = source, reason
    return error


def as_conversation(conversation: Union[Conversation, list[Message]]) -> Conversation:
    """A ``Conversation`` (a bare list of messages is one without tools)."""
    return conversation if isinstance(conversation, Conversation) else Conversation(list(conversation))


@dataclass
class TokenizedExample:
    source: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss; unshifted (labels[i] is the target when predicting token i)
    last_turn: Optional[tuple[int, int]] = None
    """``(start, end)`` of the last trained assistant turn, its role header included (used by truncation)."""
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        """Tokens that will carry loss after the causal shift (a label at position 0 has no predictor)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def resolve_chat_template(tokenizer, override: Optional[str]) -> None:
    """Install ``data.chat_template`` (a Jinja string or a ``.jinja`` path) on the tokenizer, or check it has one.

    Raises:
        DataError: when neither the tokenizer nor the config provides a template (before any model loads).
    """
    if override:
        path = Path(override).expanduser()
        tokenizer.chat_template = path.read_text() if path.suffix == ".jinja" and path.is_file() else override
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template; set data.chat_template to a Jinja string or a .jinja file "
            "(for example the ChatML template in dtrain/assets/tiny/)"
        )


def _single_token_id(tokenizer, token: str) -> int:
    """The id of ``token`` if the tokenizer reads it as exactly that one token.

    The unknown token is not a reason to refuse: Granite's and GPT-2's unk *is* their end token. What counts is that
    the token round-trips: its id maps back to it, and encoding its text gives that id alone.
    """
    token_id = tokenizer.convert_tokens_to_ids(token)
    if (
        not isinstance(token_id, int)
        or tokenizer.convert_ids_to_tokens(token_id) != token
        or tokenizer(token, add_special_tokens=False)["input_ids"] != [token_id]
    ):
        raise DataError(f"data.end_of_turn_token={token!r} is not a single token of this tokenizer")
    return token_id


class ChatRenderer:
    """Renders messages to token ids and labels with one tokenizer and one masking strategy."""

    def __init__(self, tokenizer, train_on: TrainOn, end_of_turn_token: Optional[str] = None):
        self.tokenizer = tokenizer
        self.train_on = train_on
        token = end_of_turn_token or tokenizer.eos_token
        if token is None:
            raise DataError("the tokenizer has no eos token; set data.end_of_turn_token to the token that ends an assistant turn")
        self.end_of_turn_token = token
        self.end_of_turn_id = _single_token_id(tokenizer, token)
        self.pieces = PieceEncoder(tokenizer)
        self._call_forms: Optional[CallForms] = None  # probed on the first conversation with tool calls

    def _renders(self, conversation: Conversation, source: str) -> Renders:
        """Prefix renders of a chat conversation, its messages in the form the template takes them."""
        messages = conversation.messages
        if any(m.get("tool_calls") for m in messages):
            if self._call_forms is None:
                self._call_forms = call_forms(self.tokenizer)
            messages = template_messages(messages, self._call_forms)
        elif any("train" in m for m in messages):
            messages = [{k: v for k, v in m.items() if k != "train"} for m in messages]
        return Renders(self.tokenizer, messages, source, conversation.tools, conversation.template_kwargs)

    def for_source(self, train_on: Optional[TrainOn], chat_template: Optional[str]) -> ChatRenderer:
        """This renderer with a source's own masking and template (``data.sources[i]``; None: this renderer's)."""
        if train_on in (None, self.train_on) and not chat_template:
            return self
        train_on = train_on or self.train_on
        tokenizer = self.tokenizer
        if chat_template:
            # A copy carries the source's template; the run's tokenizer (exported with the model) keeps its own.
            tokenizer = copy.copy(tokenizer)
            resolve_chat_template(tokenizer, chat_template)
        return ChatRenderer(tokenizer, train_on, self.end_of_turn_token)

    def encode_text(self, text: str) -> list[int]:
        # The template already writes any BOS it wants; adding special tokens again would double it.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render_prompt(self, conversation: Union[Conversation, list[Message]]) -> list[int]:
        """Token ids of a conversation followed by the assistant generation prompt (for generation), with the
        record's tools and template arguments.

        Tokenised as training tokenises the same conversation (same cuts, content as text), so the ids equal the
        prefix of a training example that precedes its next assistant turn.
        """
        conversation = as_conversation(conversation)
        renders = self._renders(conversation, "<prompt>")
        n = len(renders.messages)
        text = renders(n, generation_prompt=True)
        return self._encode(renders, text, n, self._turns(renders, text, n, strict=())).ids

    def render(self, conversation: Union[Conversation, list[Message]], source: str = "<example>") -> TokenizedExample:
        """Token ids and labels for one conversation (see ``render_examples``).

        Raises:
            DataError: as ``render_examples``, or if the conversation needs one example per assistant turn.
        """
        examples = self.render_examples(conversation, source)
        if len(examples) != 1:
            raise DataError(
                f"{source}: the chat template renders earlier assistant turns differently once later turns follow, so this "
                "conversation trains as one example per assistant turn; use ChatRenderer.render_examples"
            )
        return examples[0]

    def render_examples(
        self, conversation: Union[Conversation, list[Message]], source: str = "<example>", notes: Optional[Counter] = None
    ) -> list[TokenizedExample]:
        """Token ids and labels for one conversation: one example, or one per trained turn.

        Each trained assistant turn contributes what the model produces after its generation prompt: its content
        (or tool calls, and the reasoning the template writes) as the template writes it and the end-of-turn token
        that closes it (once); system, user and tool messages, role headers and the template's separators after the
        end token get no loss, unless a message's ``train`` flag overrides ``data.train_on`` (a user turn trained
        by it is trained from its content through its end-of-turn token). If the template rewrites an earlier trained
        turn once later turns follow it (the rendered prefix is not a prefix of the whole), each trained turn becomes
        its own example: the conversation up to and including that turn, after the prompt the template gives it at
        inference. A plain conversation is its segments' text and the EOS token, without a template.

        Args:
            conversation: The conversation (a bare list of messages is one without tools).
            source: ``file:line`` of the record, for errors and the examples' names.
            notes: Counts what preparation reports once at start (records whose reasoning the template ignores).

        Raises:
            ChatTemplateError: the template refused the conversation (its message and the record's source).
            TemplateCannotRender: the template leaves out a tool call or result, or moves part of the conversation
                so that no example shows a turn as the model sees it at inference.
            DataError: if a trained turn is not closed by the end-of-turn token (the model would never learn to stop),
                or its content or prompt cannot be placed in the rendered text.
        """
        conversation = as_conversation(conversation)
        if conversation.is_plain:
            return [self._plain_example(conversation, source)]
        renders = self._renders(conversation, source)
        n = len(renders.messages)
        text = renders(n)
        missing = dropped_parts(renders, text)
        if missing:
            raise TemplateCannotRender(
                source,
                TEMPLATE_DROPS,
                f"it does not render {', '.join(missing)}; training on it would teach answers to calls or results the model "
                "never sees. Use a template that renders tool calls and tool results (data.chat_template)",
            )
        trained = self._trained(conversation.messages)
        if notes is not None and any(reasoning_ignored(renders, i) for i, m in enumerate(renders.messages) if m["role"] == "assistant"):
            notes[REASONING_IGNORED] += 1
        try:
            turns = self._turns(renders, text, n, strict=trained)
            self._check_unchanged(renders, text, turns, trained)
        except TemplateRewrites:
            named = (lambda k: f"{source}#turn{k}") if len(trained) > 1 else (lambda k: source)
            return [self._turn_example(renders, i, named(k)) for k, i in enumerate(trained, 1)]
        return [self._example(renders, text, n, turns, trained, source)]

    def _trained(self, messages: list[Message]) -> list[int]:
        """Indices of the trained messages: ``data.train_on``'s assistant turns, overridden by ``train`` flags
        (``train_on=all`` trains every token, flags or not)."""
        if self.train_on == TrainOn.all:
            return []
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        default = set(assistant if self.train_on == TrainOn.assistant else assistant[-1:])
        return [i for i, m in enumerate(messages) if m.get("train", i in default) is True]

    def _turns(self, renders: Renders, text: str, n: int, strict) -> dict[int, Turn]:
        """The placed turns among ``messages[:n]`` (assistant turns and ``strict``); those not in ``strict`` are
        skipped if they cannot be placed."""
        turns = {}
        for i in range(n):
            if renders.messages[i]["role"] != "assistant" and i not in strict:
                continue
            try:
                turns[i] = locate_turn(renders, text, i, self.end_of_turn_token)
            except (TemplateRewrites, DataError):
                if i in strict:
                    raise
        return turns

    def _check_unchanged(self, renders: Renders, text: str, turns: dict[int, Turn], trained: list[int]) -> None:
        """Raise ``TemplateRewrites`` if a trained turn renders differently when it is the last message."""
        for i in trained:
            if i + 1 < len(renders.messages):
                turn = turns[i]
                if not renders(i + 1).startswith(text[: turn.closing[1] if turn.closing else turn.content[1]]):
                    raise TemplateRewrites

    def _turn_example(self, renders: Renders, i: int, source: str) -> TokenizedExample:
        """The example that trains turn ``i`` alone: the prompt the template gives it at inference, then the turn as
        the render that ends with it writes it."""
        text = self._inference_text(renders, i)
        try:
            turns = self._turns(renders, text, i + 1, strict=[i])
        except TemplateRewrites as e:
            raise TemplateCannotRender(
                source,
                TEMPLATE_MOVES,
                f"{e}: the chat template drops or moves part of the conversation once the answer follows (Mistral's templates "
                "write the system message only into a final user message), so no example shows the model what it sees at "
                "inference; use a template that renders the conversation the same way (data.chat_template)",
            ) from None
        return self._example(renders, text, i + 1, turns, [i], source)

    @staticmethod
    def _inference_text(renders: Renders, i: int) -> str:
        """The render ending with message ``i``; where it does not begin with the prompt rendered for that turn
        (Hermes writes the last tool result without the newline it writes before a later turn), the prompt followed
        by what that render writes after its own generation prompt."""
        own = renders(i + 1)
        if renders.messages[i]["role"] != "assistant":
            return own
        prompt, head = renders(i, generation_prompt=True), renders(i)
        if own.startswith(prompt) or not prompt.startswith(head) or len(prompt) == len(head):
            return own
        opening = prompt[len(head) :]
        at = own.find(opening, common_prefix_length(head, own))
        return prompt + own[at + len(opening) :] if at >= 0 else own

    def _example(self, renders: Renders, text: str, n: int, turns: dict[int, Turn], trained: list[int], source: str) -> TokenizedExample:
        """The example for ``text`` (a render of ``messages[:n]``), turns ``trained`` trained."""
        encoded = self._encode(renders, text, n, turns)
        ids = encoded.ids
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids[:2] == [bos, bos]:
            raise DataError(
                f"{source}: the rendered conversation starts with two BOS tokens; the chat template and the tokenizer both add one"
            )
        if self.train_on == TrainOn.all:
            return TokenizedExample(source, ids, list(ids))
        labels = [IGNORE_INDEX] * len(ids)
        last_turn = None
        for i in trained:
            start, end = self._trained_span(encoded, turns[i], source, i, renders.messages[i]["role"])
            labels[start:end] = ids[start:end]
            last_turn = (encoded.covering(turns[i].header), end)
        return TokenizedExample(source, ids, labels, last_turn)

    def _trained_span(self, encoded: Encoded, turn: Turn, source: str, i: int, role: str) -> tuple[int, int]:
        """Token range of turn ``i``'s trained part: checked to end with the end-of-turn token that closes it."""
        token = self.end_of_turn_token
        if turn.closing is None:
            raise DataError(
                f"{source}: {role} message {i} is not closed by the end-of-turn token {token!r} in the rendered template "
                f"(it writes {turn.after!r} after the content), so the model would never learn to stop; set "
                "data.end_of_turn_token to the token your template writes after an assistant turn, or use a template that writes one"
            )
        start, end = encoded.index(turn.start), encoded.index(turn.closing[1])
        if end - 1 != encoded.index(turn.closing[0]) or encoded.ids[end - 1] != self.end_of_turn_id:
            raise DataError(f"{source}: the end-of-turn token {token!r} after message {i} does not encode as that one token")
        return start, end

    def _encode(self, renders: Renders, text: str, n: int, turns: dict[int, Turn]) -> Encoded:
        """Tokenise ``text`` (a render of ``messages[:n]``) cut where trained spans start and end, content as text."""
        cuts = [c for turn in turns.values() for c in (turn.start, *(turn.closing or ()))]
        spans = [turn.content for turn in turns.values()]
        special = self.pieces.has_special_text
        for j, message in enumerate(renders.messages[:n]):
            if not any(special(s) for s in message_strings(message)):
                continue
            if j in turns:  # the turn's reasoning and calls (its content, when found, is already a span)
                turn = turns[j]
                rest = {k: v for k, v in message.items() if k != "content" or turn.content[0] == turn.content[1]}
                spans += message_text_spans(text, turn.header, turn.closing[1] if turn.closing else len(text), rest, special)
                continue
            span = self._content_span(renders, text, j) if message.get("content") and special(message["content"]) else None
            spans += [span] if span else []
            others = {k: v for k, v in message.items() if k != "content"}
            if any(special(s) for s in message_strings(others)):  # an untrained turn's reasoning and calls
                spans += message_text_spans(text, span[1] if span else self._head(renders, text, j), len(text), others, special)
        return self.pieces.encode(text, cuts, spans)

    def _plain_example(self, conversation: Conversation, source: str) -> TokenizedExample:
        """Segments tokenised as text (cut between segments, never read as special tokens), then the EOS token."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise DataError(f"{source}: a plain-text record ends with the EOS token, and this tokenizer has none")
        text, bounds = "", []
        for segment, _ in conversation.segments:
            bounds.append((len(text), len(text) + len(segment)))
            text += segment
        encoded = self.pieces.encode(text, [b for bound in bounds for b in bound], [(0, len(text))])
        ids = [*encoded.ids, eos]
        if self.train_on == TrainOn.all:
            return TokenizedExample(source, ids, list(ids), (0, len(ids)))
        labels = [IGNORE_INDEX] * len(ids)
        first = len(ids) - 1
        for (start, end), (_, trained) in zip(bounds, conversation.segments):
            if trained and end > start:
                a, b = encoded.index(start), encoded.index(end)
                labels[a:b] = ids[a:b]
                first = min(first, a)
        labels[-1] = eos
        return TokenizedExample(source, ids, labels, (first, len(ids)))

    @staticmethod
    def _content_span(renders: Renders, text: str, j: int) -> Optional[tuple[int, int]]:
        """Where message ``j`` (not an assistant turn) sits in ``text``, searched after the messages before it.

        None if the template does not write it (Mistral's drops a system message unless a user message ends the chat).
        """
        return find_content(text, ChatRenderer._head(renders, text, j), renders.messages[j]["content"])

    @staticmethod
    def _head(renders: Renders, text: str, j: int) -> int:
        """Where message ``j`` starts in ``text``: the end of the render of the messages before it, as far as it agrees."""
        try:
            head = renders(j) if j else ""
        except ChatTemplateError:  # a prefix the template refuses on its own (e.g. a lone system message)
            head = ""
        return common_prefix_length(head, text)

    def truncate(self, example: TokenizedExample, max_len: int) -> TokenizedExample:
        """Fit ``example`` into ``max_len`` tokens: the prompt's head, then the last trained assistant turn.

        When that turn alone is longer than ``max_len``, its beginning is kept. The caller drops the result if no
        trained token is left.
        """
        if len(example.input_ids) <= max_len:
            return example
        start, end = example.last_turn or (len(example.input_ids), len(example.input_ids))
        head = max(0, max_len - (end - start))
        keep = list(range(head)) + list(range(start, end))[: max_len - head]
        truncated = TokenizedExample(
            example.source, [example.input_ids[i] for i in keep], [example.labels[i] for i in keep], (head, len(keep)), True
        )
        assert len(truncated.input_ids) <= max_len  # verified, never assumed
        return truncated

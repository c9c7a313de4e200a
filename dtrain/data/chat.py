"""Rendering conversations through the chat template, with labels taken from the message structure.

The trained span of an assistant turn is found by rendering the conversation up to that turn (with the
generation prompt) and up to its end: the tokens in between are that turn's, by construction. Nothing here
searches the token stream for a template string, and padding is never identified by token id, so a
tokenizer whose pad token equals its EOS token still trains the EOS that ends each answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dtrain.config.schema import TrainOn
from dtrain.data.formats import Message
from dtrain.errors import DataError

IGNORE_INDEX = -100


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


class ChatRenderer:
    """Renders messages to token ids and labels with one tokenizer and one masking strategy."""

    def __init__(self, tokenizer, train_on: TrainOn, end_of_turn_token: Optional[str] = None):
        self.tokenizer = tokenizer
        self.train_on = train_on
        token = end_of_turn_token or tokenizer.eos_token
        if token is None:
            raise DataError("the tokenizer has no eos token; set data.end_of_turn_token to the token that ends an assistant turn")
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(token)
        if self.end_of_turn_id is None or self.end_of_turn_id == tokenizer.unk_token_id:
            raise DataError(f"data.end_of_turn_token={token!r} is not a single token of this tokenizer")

    def encode_text(self, text: str) -> list[int]:
        # The template already writes any BOS it wants; adding special tokens again would double it.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render_prompt(self, messages: list[Message]) -> list[int]:
        """Token ids of ``messages`` followed by the assistant generation prompt (for generation)."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode_text(text)

    def render(self, messages: list[Message], source: str = "<example>") -> TokenizedExample:
        """Token ids and labels for one conversation.

        Each trained assistant turn contributes its content and the end-of-turn token that closes it (once);
        system and user turns, role headers and the template's separators after the end token get no loss.

        Raises:
            DataError: if the template's renders are not token-prefixes of each other (masks would be wrong),
                or an assistant turn has no end-of-turn token.
        """
        full = self.encode_text(self.tokenizer.apply_chat_template(messages, tokenize=False))
        bos = self.tokenizer.bos_token_id
        if bos is not None and full[:2] == [bos, bos]:
            raise DataError(
                f"{source}: the rendered conversation starts with two BOS tokens; the chat template and the tokenizer both add one"
            )
        if self.train_on == TrainOn.all:
            return TokenizedExample(source, full, list(full))
        labels = [IGNORE_INDEX] * len(full)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == TrainOn.last_assistant:
            turns = turns[-1:]
        last_turn = None
        for i in turns:
            header = self._prefix_length(messages[:i], full, source, add_generation_prompt=False)
            start = self._prefix_length(messages[:i], full, source, add_generation_prompt=True)
            end = self._prefix_length(messages[: i + 1], full, source, add_generation_prompt=False)
            span_end = self._end_of_turn(full, start, end, source, i)
            labels[start:span_end] = full[start:span_end]
            last_turn = (header, span_end)
        return TokenizedExample(source, full, labels, last_turn)

    def _prefix_length(self, messages: list[Message], full: list[int], source: str, add_generation_prompt: bool) -> int:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        ids = self.encode_text(text)
        if full[: len(ids)] != ids:
            raise DataError(
                f"{source}: the chat template's render of the first {len(messages)} message(s) is not a token prefix "
                "of the whole conversation, so turn boundaries cannot be taken from the message structure; "
                "use a template whose turns end with a special token (set data.chat_template)"
            )
        return len(ids)

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

    def _end_of_turn(self, full: list[int], start: int, end: int, source: str, turn: int) -> int:
        """Index one past the last end-of-turn token inside ``full[start:end]``."""
        for j in range(end - 1, start - 1, -1):
            if full[j] == self.end_of_turn_id:
                return j + 1
        token = self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)
        raise DataError(
            f"{source}: assistant message {turn} is not closed by the end-of-turn token {token!r} in the rendered "
            "template, so the model would never learn to stop; set data.end_of_turn_token to the token your template "
            "writes after an assistant turn, or use a template that writes one"
        )

"""Tokenising rendered chat text in pieces: message content stays text, and masks fall on token boundaries.

A special token (``<|im_end|>``, ``</s>``, ``<end_of_turn>``...) becomes that token only where the template wrote it.
Inside a message's content its text is tokenised as plain characters, as user text is at inference, so an answer
that mentions ``<|im_end|>`` is never trained to emit the control token (the model would learn to stop mid-answer).
The text is also cut at given offsets (where a trained span starts and ends) and each side is tokenised on its own,
so a merge across a cut (a header's ``"\\n"`` with an answer's leading ``"\\n\\n"`` under a byte-level BPE) cannot move
a mask. A piece that continues the text is tokenised without the ``"▁"`` that a SentencePiece-style tokenizer puts
at the start of an input; the first piece, and with ``prepend_scheme="always"`` a piece after a special token, get
it as the tokenizer would give it in one pass over the text.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from typing import Optional

from tokenizers import Tokenizer


@dataclass
class Encoded:
    """Token ids of a text and the character offset each token starts at."""

    ids: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    _pieces: dict[int, int] = field(default_factory=dict)  # character offset where a piece starts -> its first token

    def index(self, offset: int) -> int:
        """Index of the first token at or after character ``offset`` (exact at the cuts ``encode`` was given)."""
        if offset in self._pieces:
            return self._pieces[offset]
        return bisect.bisect_left(self.starts, offset)

    def covering(self, offset: int) -> int:
        """Index of the token that holds character ``offset`` (or starts there)."""
        i = self.index(offset)
        return i if i < len(self.starts) and self.starts[i] == offset else max(0, i - 1)


class PieceEncoder:
    """Tokenises rendered text with one tokenizer: template special tokens as tokens, everything else as text.

    Args:
        tokenizer: A transformers tokenizer (with a ``tokenizers`` backend where available).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._special = {t.content: (i, t) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        longest_first = sorted(self._special, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        self._start, self._continue, self._prefix_after_special = _text_backends(tokenizer)

    def has_special_text(self, text: str) -> bool:
        """Whether ``text`` spells one of the tokenizer's special tokens."""
        return bool(self._special_re.search(text))

    def encode(self, text: str, cuts: list[int], text_spans: list[tuple[int, int]]) -> Encoded:
        """Tokenise ``text`` with a token boundary at every offset in ``cuts``.

        Args:
            text: The rendered conversation.
            cuts: Character offsets that must fall between tokens.
            text_spans: Character ranges written from message content: special-token text there stays text.
        """
        cuts = sorted({c for c in cuts if 0 < c < len(text)})
        out = Encoded()
        pos, after = 0, "start"
        for s, e, token_id in [*self._atoms(text, cuts, text_spans), (len(text), len(text), None)]:
            edges = [pos, *(c for c in cuts if pos < c < s), s]
            for a, b in zip(edges, edges[1:]):
                if a < b:
                    self._append_text(out, text[a:b], a, after)
                    after = "text"
            if token_id is not None:
                out._pieces.setdefault(s, len(out.ids))
                out.ids.append(token_id)
                out.starts.append(s)
                after = "special"
            pos = e
        return out

    def _atoms(self, text: str, cuts: list[int], text_spans: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """(start, end, id) of the special tokens the template wrote, whitespace they strip included."""
        atoms: list[tuple[int, int, int]] = []
        for match in self._special_re.finditer(text):
            s, e = match.span()
            if any(a < e and s < b for a, b in text_spans) or any(s < c < e for c in cuts):
                continue  # spelled inside a message's content, or cut: text
            token_id, token = self._special[match.group()]
            if token.lstrip:  # the tokenizer folds the whitespace before it into the token; never across a cut
                floor = max([0, atoms[-1][1] if atoms else 0, *(c for c in cuts if c <= s), *(b for _, b in text_spans if b <= s)])
                while s > floor and text[s - 1].isspace():
                    s -= 1
            if token.rstrip:
                ceiling = min([len(text), *(c for c in cuts if c >= e), *(a for a, _ in text_spans if a >= e)])
                while e < ceiling and text[e].isspace():
                    e += 1
            atoms.append((s, e, token_id))
        return atoms

    def _append_text(self, out: Encoded, piece: str, offset: int, after: str) -> None:
        out._pieces.setdefault(offset, len(out.ids))
        backend = self._start if after == "start" or (after == "special" and self._prefix_after_special) else self._continue
        if backend is None:
            ids = _encode_without_backend(self.tokenizer, piece, continues=after != "start")
            out.ids += ids
            out.starts += [offset] * len(ids)
            return
        encoding = backend.encode(piece, add_special_tokens=False)
        out.ids += encoding.ids
        # Offsets are non-decreasing within a piece; clamp them so the piece's tokens sort after the previous piece's.
        out.starts += [offset + max(0, start) for start, _ in encoding.offsets]


def _text_backends(tokenizer) -> tuple[Optional[Tokenizer], Optional[Tokenizer], bool]:
    """Copies of the tokenizer's backend that read special tokens as text: as is, and without a prepended "▁".

    Returns:
        (backend for the start of the text, backend for a piece that continues it, whether the tokenizer prepends
        "▁" after every special token as at the start of the text).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, None, False
    spec = json.loads(backend.to_str())
    spec["truncation"] = spec["padding"] = None
    always = _prefix_scheme(spec) == "always"
    start = Tokenizer.from_str(json.dumps(spec))
    _drop_prefix(spec)
    continued = Tokenizer.from_str(json.dumps(spec))
    for copy in (start, continued):
        copy.encode_special_tokens = True
    return start, continued, always


def _components(node: Optional[dict]) -> list[dict]:
    """A normalizer or pre-tokenizer spec and the specs inside it (``Sequence``)."""
    if not node:
        return []
    inner = node.get("normalizers") or node.get("pretokenizers") or []
    return [node, *(c for child in inner for c in _components(child))]


def _prefix_scheme(spec: dict) -> str:
    """Where the tokenizer prepends "▁" (or a space): "always" (every section), "first" (start of input) or "never"."""
    parts = _components(spec.get("normalizer")) + _components(spec.get("pre_tokenizer"))
    if any(p.get("type") == "Prepend" or p.get("prepend_scheme") == "always" or p.get("add_prefix_space") for p in parts):
        return "always"
    if any(p.get("prepend_scheme") == "first" for p in parts):
        return "first"
    return "never"


def _drop_prefix(spec: dict) -> None:
    for part in _components(spec.get("normalizer")) + _components(spec.get("pre_tokenizer")):
        if "normalizers" in part:
            part["normalizers"] = [n for n in part["normalizers"] if n.get("type") != "Prepend"]
        if "prepend_scheme" in part:
            part["prepend_scheme"] = "never"
        if "add_prefix_space" in part:
            part["add_prefix_space"] = False
    if (spec.get("normalizer") or {}).get("type") == "Prepend":
        spec["normalizer"] = None


def _encode_without_backend(tokenizer, piece: str, continues: bool) -> list[int]:
    """A tokenizer without a ``tokenizers`` backend: special tokens split, and a leading newline to drop any "▁"."""
    encode = lambda text: tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if continues:
        newline, ids = encode("\n"), encode("\n" + piece)
        if ids[: len(newline)] == newline:
            return ids[len(newline) :]
    return encode(piece)

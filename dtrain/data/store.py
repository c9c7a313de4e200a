"""The token store: prepared data as flat memory-mapped arrays, written once, opened read-only by every rank.

One folder per prepared corpus; each split (``train``, ``eval``) is a set of raw little-endian arrays:

=====================  =======  ==========================================================================
file                   dtype    per
=====================  =======  ==========================================================================
``<split>.ids``        int32    token: the input ids, examples back to back
``<split>.trained``    uint8    token: 1 where the label is the token itself, 0 where no loss is taken
``<split>.offsets``    int64    example + 1: where each example starts in the token arrays
``<split>.trained_n``  int32    example: trained tokens after the causal shift (the loss normaliser)
``<split>.source``     int16    example: index of its source in the mixture (``data.sources``)
``<split>.last_turn``  int32    example x 2: start, end of the last trained turn (-1, -1: none)
``<split>.truncated``  uint8    example: cut to ``data.max_seq_len``
``<split>.names``      uint8    the examples' names (``file:line``), UTF-8 back to back
``<split>.name_off``   int64    example + 1: where each name starts
=====================  =======  ==========================================================================

plus ``meta.json`` (counts, sizes, the prompts and the drop/truncation tallies). Labels are stored as a mask
because a label is always its own input token or ignored (the mask audit checks it). Nothing here is pickled,
and nothing reads a whole array into Python objects: ``numpy.memmap`` maps the files, so the ranks of a node share
one copy through the page cache and each example is read when it is accessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence, Union, overload

import numpy as np

from dtrain.data.chat import IGNORE_INDEX, TokenizedExample

META = "meta.json"
TOKEN_ARRAYS = {"ids": np.int32, "trained": np.uint8}
EXAMPLE_ARRAYS = {"trained_n": np.int32, "source": np.int16, "last_turn": np.int32, "truncated": np.uint8}
NAME_ARRAYS = {"names": np.uint8}
OFFSET_ARRAYS = ("offsets", "name_off")


class SplitWriter:
    """Appends examples to one split's files as they are prepared (no list of the corpus is ever held)."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split = folder, split
        names = (*TOKEN_ARRAYS, *EXAMPLE_ARRAYS, *NAME_ARRAYS, *OFFSET_ARRAYS)
        self.files = {name: (folder / f"{split}.{name}").open("wb") for name in names}
        self.num_examples = self.num_tokens = self.name_bytes = 0
        self.max_token_id = -1
        self.num_trained = 0
        self._write("offsets", np.zeros(1, np.int64))
        self._write("name_off", np.zeros(1, np.int64))

    def _write(self, name: str, values: np.ndarray) -> None:
        self.files[name].write(np.ascontiguousarray(values).tobytes())

    def add(self, examples: Sequence[TokenizedExample], source_index: int) -> None:
        """Append ``examples`` (all from the source at ``source_index``)."""
        if not examples:
            return
        lengths = np.fromiter((len(e.input_ids) for e in examples), np.int64, len(examples))
        ids = np.fromiter((t for e in examples for t in e.input_ids), np.int64, int(lengths.sum()))
        labels = np.fromiter((t for e in examples for t in e.labels), np.int64, len(ids))
        trained = labels != IGNORE_INDEX
        if np.any(trained & (labels != ids)):
            raise ValueError("a label differs from its input token: the store keeps labels as a mask")
        self._write("ids", ids.astype(np.int32))
        self._write("trained", trained.astype(np.uint8))
        self._write("offsets", self.num_tokens + np.cumsum(lengths))
        self._write("trained_n", np.array([e.num_trained for e in examples], np.int32))
        self._write("source", np.full(len(examples), source_index, np.int16))
        self._write("last_turn", np.array([e.last_turn or (-1, -1) for e in examples], np.int32).reshape(-1, 2))
        self._write("truncated", np.array([e.truncated for e in examples], np.uint8))
        encoded = [e.source.encode() for e in examples]
        self._write("names", np.frombuffer(b"".join(encoded), np.uint8))
        self._write("name_off", self.name_bytes + np.cumsum([len(b) for b in encoded], dtype=np.int64))
        self.num_examples += len(examples)
        self.num_tokens += len(ids)
        self.name_bytes += sum(len(b) for b in encoded)
        self.num_trained += int(trained.sum())
        if len(ids):
            self.max_token_id = max(self.max_token_id, int(ids.max()))

    def close(self) -> dict:
        """Flush the files; returns this split's entry of ``meta.json``."""
        for f in self.files.values():
            f.close()
        return {"examples": self.num_examples, "tokens": self.num_tokens, "max_token_id": self.max_token_id}


class TokenStore(Sequence[TokenizedExample]):
    """One split of a token store, memory-mapped read-only; ``store[i]`` reads example ``i`` from the maps.

    The per-example arrays (``lengths``, ``num_trained``, ``source_index``) are what the packer, the sampler and
    the start-up counts work on, so none of them ever touches the token arrays.
    """

    def __init__(self, folder: Union[str, Path], split: str):
        folder = Path(folder)
        meta = json.loads((folder / META).read_text())[split]
        n, tokens = meta["examples"], meta["tokens"]
        self.folder, self.split, self.max_token_id = folder, split, meta["max_token_id"]

        def mapped(name: str, dtype, count: int, shape=None) -> np.ndarray:
            if count == 0:  # numpy cannot map an empty file
                return np.zeros(shape or (0,), dtype)
            return np.memmap(folder / f"{split}.{name}", dtype=dtype, mode="r", shape=shape or (count,))

        self.ids = mapped("ids", np.int32, tokens)
        self.trained = mapped("trained", np.uint8, tokens)
        self.offsets = mapped("offsets", np.int64, n + 1)
        self.num_trained = mapped("trained_n", np.int32, n)
        self.source_index = mapped("source", np.int16, n)
        self.last_turn = mapped("last_turn", np.int32, 2 * n, (n, 2))
        self.truncated = mapped("truncated", np.uint8, n)
        self.name_offsets = mapped("name_off", np.int64, n + 1)
        self.names = mapped("names", np.uint8, int(self.name_offsets[-1]))
        self.lengths = np.diff(self.offsets) if n else np.zeros(0, np.int64)
        """Tokens per example (an in-memory array of 8 bytes per example)."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def name(self, i: int) -> str:
        return bytes(self.names[self.name_offsets[i] : self.name_offsets[i + 1]]).decode()

    @overload
    def __getitem__(self, i: int) -> TokenizedExample: ...

    @overload
    def __getitem__(self, i: slice) -> list[TokenizedExample]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[start:end]
        labels = np.where(self.trained[start:end] != 0, ids, IGNORE_INDEX)
        turn = self.last_turn[i]
        return TokenizedExample(
            self.name(i), ids.tolist(), labels.tolist(), (int(turn[0]), int(turn[1])) if turn[0] >= 0 else None, bool(self.truncated[i])
        )

    def __iter__(self) -> Iterator[TokenizedExample]:
        return (self[i] for i in range(len(self)))

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


def write_meta(folder: Path, meta: dict) -> None:
    (folder / META).write_text(json.dumps(meta, indent=1))


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text())

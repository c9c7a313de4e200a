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

plus ``meta.json`` (counts, the prompts, the drop/truncation tallies, and each file's size and CRC-32, computed
while it was written). Opening a split checks its files' sizes (a store cut short by an interrupted copy or a full
disk is refused, naming the file); :func:`store_problems` with ``checksums=True`` re-reads every byte
(``launch/prepare.py --verify``, ``data.verify_store=true``). Labels are stored as a mask
because a label is always its own input token or ignored (the mask audit checks it). Nothing here is pickled,
and no token array is ever read whole or turned into Python objects: each example is read when it is accessed,
through the page cache the ranks of a node share (``TokenStore``).
"""

from __future__ import annotations

import itertools
import json
import os
import zlib
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterator, Sequence, Union, overload

import numpy as np

from dtrain import faults
from dtrain.data.chat import IGNORE_INDEX, TokenizedExample
from dtrain.errors import DataError

META = "meta.json"
TOKEN_ARRAYS = {"ids": np.int32, "trained": np.uint8}
EXAMPLE_ARRAYS = {"trained_n": np.int32, "source": np.int16, "last_turn": np.int32, "truncated": np.uint8}
NAME_ARRAYS = {"names": np.uint8}
OFFSET_ARRAYS = ("offsets", "name_off")
SPLITS = ("train", "eval")
_APPENDS = itertools.count(1)
"""Appends to token stores by this process, for ``DTRAIN_FAULT_ENOSPC=store:<n>``."""


@dataclass
class PackedExamples:
    """Examples laid out as the store's arrays: cheap to send between processes and to append."""

    ids: np.ndarray
    trained: np.ndarray
    lengths: np.ndarray
    num_trained: np.ndarray
    last_turn: np.ndarray
    truncated: np.ndarray
    names: bytes
    name_ends: np.ndarray


def pack_examples(examples: Sequence[TokenizedExample]) -> PackedExamples:
    """The store's arrays of ``examples``.

    Raises:
        ValueError: A label that is neither ignored nor its own input token (the store keeps labels as a mask).
    """
    lengths = np.fromiter((len(e.input_ids) for e in examples), np.int64, len(examples))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(e.input_ids for e in examples), np.int64, total)
    labels = np.fromiter(chain.from_iterable(e.labels for e in examples), np.int64, total)
    trained = labels != IGNORE_INDEX
    if np.any(trained & (labels != ids)):
        raise ValueError("a label differs from its input token: the store keeps labels as a mask")
    starts = np.cumsum(lengths) - lengths
    # Trained after the causal shift: an example's first label has no predictor.
    counts = np.add.reduceat(trained, starts) - trained[starts] if len(examples) and total else np.zeros(len(examples), np.int64)
    encoded = [e.source.encode() for e in examples]
    return PackedExamples(
        ids=ids.astype(np.int32),
        trained=trained.astype(np.uint8),
        lengths=lengths,
        num_trained=np.asarray(counts, np.int32),
        last_turn=np.array([e.last_turn or (-1, -1) for e in examples], np.int32).reshape(-1, 2),
        truncated=np.array([e.truncated for e in examples], np.uint8),
        names=b"".join(encoded),
        name_ends=np.cumsum([len(b) for b in encoded], dtype=np.int64),
    )


class SplitWriter:
    """Appends examples to one split's files as they are prepared (no list of the corpus is ever held)."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split = folder, split
        names = (*TOKEN_ARRAYS, *EXAMPLE_ARRAYS, *NAME_ARRAYS, *OFFSET_ARRAYS)
        self.files = {name: (folder / f"{split}.{name}").open("wb") for name in names}
        # Each file's size and CRC-32 as its bytes go out: meta.json gets them without a second pass over the data.
        self.sizes = dict.fromkeys(names, 0)
        self.crcs = dict.fromkeys(names, 0)
        self.num_examples = self.num_tokens = self.name_bytes = 0
        self.max_token_id = -1
        self.num_trained = 0
        self._write("offsets", np.zeros(1, np.int64))
        self._write("name_off", np.zeros(1, np.int64))

    def _write(self, name: str, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values).tobytes()
        self.files[name].write(data)
        self.sizes[name] += len(data)
        self.crcs[name] = zlib.crc32(data, self.crcs[name])

    @property
    def bytes_written(self) -> int:
        return sum(self.sizes.values())

    def add_packed(self, packed: PackedExamples, source_index: int) -> None:
        """Append examples already laid out as arrays (``pack_examples``: done by the worker that prepared them)."""
        n = len(packed.lengths)
        if n == 0:
            return
        faults.no_space("store", next(_APPENDS), None, self.folder / f"{self.split}.ids")
        self._write("ids", packed.ids)
        self._write("trained", packed.trained)
        self._write("offsets", self.num_tokens + np.cumsum(packed.lengths))
        self._write("trained_n", packed.num_trained)
        self._write("source", np.full(n, source_index, np.int16))
        self._write("last_turn", packed.last_turn)
        self._write("truncated", packed.truncated)
        self._write("names", np.frombuffer(packed.names, np.uint8))
        self._write("name_off", self.name_bytes + packed.name_ends)
        self.num_examples += n
        self.num_tokens += len(packed.ids)
        self.name_bytes += len(packed.names)
        self.num_trained += int(packed.num_trained.sum())
        if len(packed.ids):
            self.max_token_id = max(self.max_token_id, int(packed.ids.max()))

    def close(self) -> dict:
        """Flush the files; returns this split's entry of ``meta.json``."""
        for f in self.files.values():
            f.close()
        files = {name: {"bytes": self.sizes[name], "crc32": self.crcs[name]} for name in self.files}
        return {"examples": self.num_examples, "tokens": self.num_tokens, "max_token_id": self.max_token_id, "files": files}


class TokenStore(Sequence[TokenizedExample]):
    """One split of a token store; ``store[i]`` reads example ``i`` from the files.

    The per-example arrays (``lengths``, ``num_trained``, ``source_index``, about 40 bytes per example) are read into
    memory: the packer, the sampler and the start-up counts work on them and never touch the tokens. Tokens, masks
    and names are read per example with positioned reads (``os.pread``) through the page cache, which the ranks of a
    node share. Positioned reads rather than ``numpy.memmap``: a fault on a mapped page makes the kernel map its
    neighbours too (fault-around, read-around), so sampling a few thousand examples of a large mapped store put
    gigabytes of shared pages into every rank's resident set (measured in ``bench/corpus.py``). Reads are
    thread-safe (the collation thread and the training thread share a store).
    """

    def __init__(self, folder: Union[str, Path], split: str):
        """
        Raises:
            DataError: A file of the split is missing or has another size than ``meta.json`` records.
        """
        folder = Path(folder)
        meta = json.loads((folder / META).read_text())[split]
        problems = split_problems(folder, split, meta)
        if problems:
            raise DataError(damaged_message(folder, problems))
        n, self.num_tokens = meta["examples"], meta["tokens"]
        self.folder, self.split, self.max_token_id = folder, split, meta["max_token_id"]

        def loaded(name: str, dtype, count: int) -> np.ndarray:
            return np.fromfile(folder / f"{split}.{name}", dtype=dtype, count=count)

        self.offsets = loaded("offsets", np.int64, n + 1)
        self.num_trained = loaded("trained_n", np.int32, n)
        self.source_index = loaded("source", np.int16, n)
        self.last_turn = loaded("last_turn", np.int32, 2 * n).reshape(n, 2)
        self.truncated = loaded("truncated", np.uint8, n)
        self.name_offsets = loaded("name_off", np.int64, n + 1)
        self.lengths = np.diff(self.offsets)
        """Tokens per example."""
        # Opened once, closed with the store: a prepared store may be read by a long run while others open it too.
        self._files = {name: os.open(folder / f"{split}.{name}", os.O_RDONLY) for name in ("ids", "trained", "names")}

    def __del__(self):
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    def _read(self, name: str, dtype, start: int, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        data = os.pread(self._files[name], count * size, start * size)
        if len(data) != count * size:
            raise ValueError(f"{self.folder}/{self.split}.{name} is shorter than its meta.json says: the store is damaged")
        return np.frombuffer(data, dtype=dtype)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def name(self, i: int) -> str:
        start, end = int(self.name_offsets[i]), int(self.name_offsets[i + 1])
        return self._read("names", np.uint8, start, end - start).tobytes().decode()

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
        ids = self._read("ids", np.int32, start, end - start)
        labels = np.where(self._read("trained", np.uint8, start, end - start) != 0, ids, IGNORE_INDEX)
        turn = self.last_turn[i]
        return TokenizedExample(
            self.name(i), ids.tolist(), labels.tolist(), (int(turn[0]), int(turn[1])) if turn[0] >= 0 else None, bool(self.truncated[i])
        )

    def __iter__(self) -> Iterator[TokenizedExample]:
        return (self[i] for i in range(len(self)))


def write_meta(folder: Path, meta: dict) -> None:
    (folder / META).write_text(json.dumps(meta, indent=1))


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text())


# ---------------------------------------------------------------------------------------------- integrity


def file_crc32(path: Path, chunk_bytes: int = 1 << 24) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            crc = zlib.crc32(chunk, crc)
    return crc


def split_problems(folder: Path, split: str, entry: dict, checksums: bool = False) -> list[str]:
    """What is wrong with one split's files against its ``meta.json`` entry (sizes; with ``checksums`` the bytes)."""
    problems = []
    for name, expected in (entry.get("files") or {}).items():  # a store written before checksums: nothing to check
        path = folder / f"{split}.{name}"
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != expected["bytes"]:
            problems.append(f"{path} has {size} bytes, meta.json says {expected['bytes']} (cut short: an interrupted copy, a full disk?)")
        elif checksums and (crc := file_crc32(path)) != expected["crc32"]:
            problems.append(f"{path} has CRC-32 {crc:08x}, meta.json says {expected['crc32']:08x} (its bytes changed after it was written)")
    return problems


def store_problems(folder: Path, checksums: bool = False) -> list[str]:
    """What is wrong with the token store in ``folder``: missing or resized files, and with ``checksums`` changed bytes."""
    meta = read_meta(folder)
    return [p for split in SPLITS for p in split_problems(folder, split, meta.get(split) or {}, checksums)]


def damaged_message(folder: Path, problems: list[str]) -> str:
    return (
        f"the token store {folder} is damaged: {'; '.join(problems)}. Copy it again or prepare it again "
        "(python launch/prepare.py with the run's settings; a data.cache_dir entry is rebuilt by itself when the raw "
        "data is there)"
    )

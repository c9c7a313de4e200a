"""Reading raw records from JSONL / JSON / Parquet files, folders of them, or a hub dataset, as a stream.

Every record keeps where it came from (``file:line`` or ``dataset[row]``) so that any later error can name it.
JSONL lines are handed on unparsed (``Payload``): the preparation's worker processes parse them, so reading a
corpus costs the reading process one pass over its bytes and never a list of its records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from dtrain.errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
PARQUET_BATCH_ROWS = 4096


class InvalidRecord(DataError):
    """One bad record: ``reason`` is a short category used to count skips (``data.on_invalid=skip``)."""

    def __init__(self, source: str, reason: str, detail: str = ""):
        super().__init__(f"{source}: {reason}{f' ({detail})' if detail else ''}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class RawRecord:
    source: str  # "path/to/file.jsonl:17" or "hub-id[42]": what an error message points at
    data: dict[str, Any]
    error: Optional[str] = None  # set when the line could not even be parsed (the record is then invalid)


Payload = tuple[str, Union[str, dict]]
"""``(source, record)``: a JSONL line still to parse, or a record already read (JSON, Parquet, hub)."""


def data_files(path: str) -> list[Path]:
    """The data files behind ``path`` (one file, or a folder's data files in name order); [] for a hub id.

    Raises:
        DataError: A folder without data files, or a local-looking path that does not exist.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{p}: folder holds no {'/'.join(DATA_SUFFIXES)} files")
        return files
    if p.is_file():
        if p.suffix not in DATA_SUFFIXES:
            raise DataError(f"{p}: unsupported file type {p.suffix!r}; use one of {DATA_SUFFIXES}")
        return [p]
    if p.suffix in DATA_SUFFIXES or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or folder")
    return []


def iter_payloads(path: str, split: str = "train") -> Iterator[Payload]:
    """Every record of a file, a folder of data files, or a hub dataset, in order, one at a time."""
    files = data_files(path)
    if not files:
        yield from _hub_payloads(path, split)
    for f in files:
        yield from _file_payloads(f)


def count_records(path: str, split: str = "train") -> int:
    """How many records ``iter_payloads`` will yield: one pass over the bytes, no parsing (Parquet: its footer)."""
    files = data_files(path)
    if not files:
        return len(_hub_dataset(path, split))
    total = 0
    for f in files:
        if f.suffix == ".jsonl":
            with f.open("rb") as lines:
                total += sum(1 for line in lines if line.strip())
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(f).metadata.num_rows
        else:
            total += sum(1 for _ in _file_payloads(f))
    return total


def parse_payload(payload: Payload) -> RawRecord:
    """The record of a payload; an unparsable JSONL line becomes a record carrying its error."""
    source, record = payload
    if isinstance(record, dict):
        return RawRecord(source, record)
    try:
        data = json.loads(record)
    except json.JSONDecodeError as e:
        return RawRecord(source, {}, error=f"malformed JSON: {e.msg}")
    if not isinstance(data, dict):
        return RawRecord(source, {}, error=f"not a JSON object: {type(data).__name__}")
    return RawRecord(source, data)


def load_records(path: str, split: str = "train") -> list[RawRecord]:
    """Every record of ``path`` as a list (small data and tests; preparation streams ``iter_payloads``).

    Raises:
        DataError: Malformed JSON files (with file and line), a folder without data files, an unreadable dataset.
    """
    return [parse_payload(p) for p in iter_payloads(path, split)]


def _file_payloads(path: Path) -> Iterator[Payload]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield f"{path}:{line_no}", line
    elif path.suffix == ".json":
        # A JSON list cannot be streamed with the standard library: one file is read whole (use JSONL for big data).
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        for i, r in enumerate(data):
            yield f"{path}[{i}]", r if isinstance(r, dict) else json.dumps(r)
    else:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for r in batch.to_pylist():
                yield f"{path}[row {row}]", r
                row += 1


def _hub_dataset(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub client raises many types; all mean "cannot read this dataset"
        raise DataError(f"data.path={name!r} is neither a local file/folder nor a loadable hub dataset: {e}") from e


def _hub_payloads(name: str, split: str) -> Iterator[Payload]:
    for i, r in enumerate(_hub_dataset(name, split)):
        yield f"{name}[{i}]", dict(r)

"""Reading raw records from JSONL / JSON / Parquet files, folders of them, or a hub dataset.

Every record keeps where it came from (``file:line`` or ``dataset[row]``) so that any later error can name it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dtrain.errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


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


def load_records(path: str, split: str = "train") -> list[RawRecord]:
    """Load every record of a file, a folder of data files, or a hub dataset.

    Args:
        path: A ``.jsonl``/``.json``/``.parquet`` file, a folder holding such files, or a hub dataset id.
        split: Split to read when ``path`` is a hub dataset.

    Raises:
        DataError: Malformed JSON (with file and line), a folder without data files, an unreadable dataset.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{p}: folder holds no {'/'.join(DATA_SUFFIXES)} files")
        return [r for f in files for r in _load_file(f)]
    if p.is_file():
        return _load_file(p)
    if p.suffix in DATA_SUFFIXES or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or folder (data.path)")
    return _load_hub(path, split)


def _load_file(path: Path) -> list[RawRecord]:
    if path.suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as e:
                    records.append(RawRecord(f"{path}:{line_no}", {}, error=f"malformed JSON: {e.msg}"))
                    continue
                if not isinstance(data, dict):
                    records.append(RawRecord(f"{path}:{line_no}", {}, error=f"not a JSON object: {type(data).__name__}"))
                    continue
                records.append(RawRecord(f"{path}:{line_no}", data))
        return records
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        return [RawRecord(f"{path}[{i}]", r) for i, r in enumerate(data)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [RawRecord(f"{path}[row {i}]", r) for i, r in enumerate(rows)]
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {DATA_SUFFIXES}")


def _load_hub(name: str, split: str) -> list[RawRecord]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub client raises many types; all mean "cannot read this dataset"
        raise DataError(f"data.path={name!r} is neither a local file/folder nor a loadable hub dataset: {e}") from e
    return [RawRecord(f"{name}[{i}]", dict(r)) for i, r in enumerate(ds)]

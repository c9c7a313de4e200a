"""Records load from JSONL, JSON, Parquet and folders; malformed input names its file and line."""

import json

import pytest

from dtrain.data import DataError, load_records


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_json_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(3)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for name in ("a.jsonl", "b.json", "c.parquet"):
        records = load_records(str(tmp_path / name))
        assert [r.data for r in records] == rows
    folder = load_records(str(tmp_path))
    assert len(folder) == 9 and folder[0].source == f"{tmp_path / 'a.jsonl'}:1"


def test_malformed_json_line_is_kept_as_an_invalid_record_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n\n{"messages": [oops\n')
    records = load_records(str(path))
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]
    assert records[0].error is None and records[1].error.startswith("malformed JSON")


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="holds no"):
        load_records(str(tmp_path))

"""launch/preview.py shows the trained tokens (text) and the exact tensors (JSON), packed rows included."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_preview(tmp_path, *overrides) -> str:
    out = subprocess.run(
        [sys.executable, "launch/preview.py", "+exp=tiny_cpu", f"output_dir={tmp_path}", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_text_preview_brackets_exactly_the_answer_and_its_end_token(tmp_path):
    text = run_preview(tmp_path, "preview.n=2")
    assert text.count("=== example") == 2
    trained = [chunk.split("]]")[0] for chunk in text.split("[[")[1:]]
    assert trained and all(t.endswith("<|im_end|>") and t[: -len("<|im_end|>")].isupper() for t in trained)


def test_json_preview_of_packed_rows(tmp_path):
    rows = [json.loads(line) for line in run_preview(tmp_path, "preview.n=2", "preview.format=json", "data.packing=true").splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert len(row["input_ids"]) == len(row["targets"]) == len(row["position_ids"]) <= 256
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) >= len(row["sources"]) >= 2  # every example restarts at 0 (padding may add one block)
        assert all(row["targets"][s - 1] == -100 for s in starts if s > 0)  # no example is trained to predict the next

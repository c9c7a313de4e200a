"""launch/preview.py shows the trained tokens (text) and the exact tensors (JSON), packed rows included.

The first test runs the entry point; the others call what it prints (``dtrain.data.preview.preview_job``) in this
process, which saves a Python start-up (about 4 s) each."""

import json
import subprocess
import sys
from pathlib import Path

from dtrain.config import compose_job
from dtrain.data.preview import preview_job

REPO = Path(__file__).resolve().parents[2]


def run_preview(tmp_path, *overrides) -> str:
    """``python launch/preview.py +exp=tiny_cpu <overrides>``'s standard output."""
    out = subprocess.run(
        [sys.executable, "launch/preview.py", "+exp=tiny_cpu", f"output_dir={tmp_path}", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def preview(tmp_path, *overrides) -> str:
    """What the entry point prints for the same overrides, computed in this process."""
    return preview_job(compose_job(["+exp=tiny_cpu", f"output_dir={tmp_path}", *overrides])) + "\n"


def test_text_preview_brackets_exactly_the_answer_and_its_end_token(tmp_path):
    text = run_preview(tmp_path, "preview.n=2")
    assert text.count("=== example") == 2
    trained = [chunk.split("]]")[0] for chunk in text.split("[[")[1:]]
    assert trained and all(t.endswith("<|im_end|>") and t[: -len("<|im_end|>")].isupper() for t in trained)


def test_json_preview_of_packed_rows(tmp_path):
    rows = [json.loads(line) for line in preview(tmp_path, "preview.n=2", "preview.format=json", "data.packing=true").splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert len(row["input_ids"]) == len(row["targets"]) == len(row["position_ids"]) <= 256
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) >= len(row["sources"]) >= 2  # every example restarts at 0 (padding may add one block)
        assert all(row["targets"][s - 1] == -100 for s in starts if s > 0)  # no example is trained to predict the next


def test_preview_reads_other_record_shapes_through_their_adapter(tmp_path):
    # ShareGPT records under +exp=tiny_cpu: the format is detected and the masks are those of the equivalent chats.
    data = tmp_path / "sharegpt.jsonl"
    rows = [
        {"system": "Be brief.", "conversations": [{"from": "human", "value": f"upper: ab{i}"}, {"from": "gpt", "value": f"AB{i}"}]}
        for i in range(3)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = preview(
        tmp_path, "preview.n=3", f"data.path={data}", "data.eval_path=null", "data.eval_fraction=0", f"data.cache_dir={tmp_path}"
    )
    trained = [chunk.split("]]")[0] for chunk in text.split("[[")[1:]]
    assert trained == [f"AB{i}<|im_end|>" for i in range(3)]
    assert text.count("Be brief.") == 3 and "upper: ab0" in text


def test_preview_shows_tool_calls_trained_and_tool_results_not(tmp_path):
    data = tmp_path / "tools.jsonl"
    call = {"id": "call00001", "type": "function", "function": {"name": "upper", "arguments": {"text": "abc"}}}
    messages = [
        {"role": "user", "content": "upper: abc"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call00001", "name": "upper", "content": "RESULT-ABC"},
        {"role": "assistant", "content": "ABC"},
    ]
    tools = [{"type": "function", "function": {"name": "upper", "parameters": {"type": "object", "properties": {"text": {}}}}}]
    data.write_text(json.dumps({"tools": tools, "messages": messages}) + "\n")
    overrides = [f"data.path={data}", "data.eval_path=null", "data.eval_fraction=0", f"data.cache_dir={tmp_path}"]
    qwen = ["data.chat_template=tests/assets/chat_templates/qwen2.5.jinja", "data.max_seq_len=2048"]  # its tool prompt is long
    text = preview(tmp_path, "preview.n=1", *overrides, *qwen)
    trained = [chunk.split("]]")[0] for chunk in text.split("[[")[1:]]
    assert len(trained) == 2 and '"name": "upper"' in trained[0] and trained[1] == "ABC<|im_end|>"
    assert all(t.endswith("<|im_end|>") for t in trained) and "RESULT-ABC" in text and not any("RESULT-ABC" in t for t in trained)

"""The embedded default really learns its task: `make demo`'s exact command, judged on held-out prompts."""

import json
from pathlib import Path

import pytest

from tests.conftest import launch_train, read_jsonl

pytestmark = pytest.mark.integration


def shm_segments() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


def test_demo_learns_the_bundled_task(tmp_path):
    run_dir = tmp_path / "tiny_cpu"
    segments_before = shm_segments()
    out = launch_train(["+exp=tiny_cpu"], run_dir, via_command=True, report=True)  # `make demo` runs the deepspeed command
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    before, after = read_jsonl(run_dir / "samples_before.jsonl"), read_jsonl(run_dir / "samples.jsonl")
    assert len(before) == len(after) == 64
    assert summary["accuracy_before"] == sum(s["exact_match"] for s in before) / 64 <= 0.05
    assert shm_segments() <= segments_before  # no DeepSpeed shared-memory buffers left behind in RAM
    assert summary["accuracy_after"] == sum(s["exact_match"] for s in after) / 64 >= 0.8
    assert f"trained model: {run_dir.resolve() / 'final'}" in out.stdout
    assert "exact match on 64 held-out prompts" in out.stdout
    assert (run_dir / "final" / "model.safetensors").is_file()
    # The run report: a real image of several panels, not an empty canvas.
    import matplotlib.image

    report = run_dir / "report.png"
    assert f"run report (loss, lr, grad norm, throughput, memory, samples): {report.resolve()}" in out.stdout
    image = matplotlib.image.imread(report)
    assert report.stat().st_size > 50_000 and image.shape[0] >= 800 and image.shape[1] >= 1200 and image.std() > 0.05
    memory = json.loads((run_dir / "memory.json").read_text())
    assert memory["plan"]["zero"] == 2 and len(memory["measured_per_rank"]) == 2

"""The benchmark scripts in smoke mode (a few steps of the tiny model, one launch each), so they cannot rot."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration


def run_bench(script: str, tmp_path) -> dict:
    """Hydra overrides before and after the options, as users type them, reach the launched run."""
    out_json = tmp_path / f"{script}.json"
    out = subprocess.run(
        [sys.executable, f"bench/{script}.py", "train.seed=7", "--smoke", "--json", str(out_json), "train.log_every=2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert {"train.seed=7", "train.log_every=2"} <= set(result["overrides"])
    for run in result.get("runs", [result.get("run")]):
        if run and run.get("run_dir"):
            train = yaml.safe_load((Path(run["run_dir"]) / "config.yaml").read_text())["train"]
            assert (train["seed"], train["log_every"]) == (7, 2)
    return result


def check_run(run: dict, steps: int) -> None:
    assert run["exit_code"] == 0 and run["steps"] == steps and math.isfinite(run["final_loss"])
    assert run["trained_tokens_per_s"] > 0 and run["input_tokens_per_s"] >= run["trained_tokens_per_s"]
    assert 0 < run["padding_efficiency"] <= 1 and run["tflops_per_gpu"] > 0 and run["mfu"] is None  # no GPU peak
    assert run["steps_per_epoch"] > 0 and run["epoch_time_s"] == pytest.approx(run["step_time_s"] * run["steps_per_epoch"])


def test_throughput_bench(tmp_path):
    result = run_bench("throughput", tmp_path)
    check_run(result["run"], 3)
    shares = [result["run"][f"{p}_share"] for p in ("data", "forward", "backward", "optimizer")]
    assert all(s >= 0 for s in shares) and 0.5 < sum(shares) <= 1.0 + 1e-9


@pytest.mark.extended  # packing is checked by the unit, loss-invariance and mixture tests
def test_packing_bench(tmp_path):
    (packed,) = run_bench("packing", tmp_path)["runs"]
    check_run(packed, 2)
    assert packed["name"] == "packed" and packed["padding_efficiency"] == 1.0  # one packed row per micro-batch


@pytest.mark.extended  # on CPU it times sdpa only, the throughput bench's path
def test_attention_bench(tmp_path):
    (sdpa,) = run_bench("attention", tmp_path)["runs"]
    check_run(sdpa, 2)
    assert sdpa["name"] == "sdpa" and sdpa["speed_vs_first"] == 1.0


def test_memory_bench(tmp_path):
    (row,) = run_bench("memory", tmp_path)["runs"]
    assert row["exit_code"] == 0 and row["config"] == "zero2 none"
    assert row["states_ratio"] == pytest.approx(1.0, abs=1e-3)  # the engine's tensors are what the plan says
    assert row["peak_kind"] == "peak_rss" and row["peak_mib"] > row["planned_states_mib"]


def test_corpus_bench(tmp_path):
    out_json = tmp_path / "corpus.json"
    out = subprocess.run(
        [sys.executable, "bench/corpus.py", "--smoke", "--json", str(out_json)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    one, two = result["prepare"]
    assert (one["num_proc"], two["num_proc"]) == (1, 2) and one["tokens"] == two["tokens"] > 200 * 400 and one["speedup"] == 1.0
    small, large = result["sizes"]
    assert large["train_tokens"] == 3 * small["train_tokens"] and "3 x the 200-conversation store" in large["store"]
    for size in (small, large):
        assert (
            size["time_to_step1_s"] > size["data_setup_s"] >= 0
            and len(size["peak_rss_per_rank"]) == 2
            and min(size["peak_rss_per_rank"]) > 10**8
        )
    assert len(result["rss_bytes_per_token"]) == 2
    # Record shapes: the ShareGPT corpus is the chats' conversations, so the same tokens (auto-detected formats).
    shapes = {r["shape"]: r for r in result["shapes"]}
    assert sorted(shapes) == ["chats", "sharegpt", "tools"]
    assert shapes["sharegpt"]["tokens"] == shapes["chats"]["tokens"] == one["tokens"] and shapes["sharegpt"]["vs_chats"] > 0
    assert list(shapes["sharegpt"]["formats"].values()) == ["sharegpt (detected)"]


def test_long_sequence_bench(tmp_path):
    out_json = tmp_path / "long.json"
    out = subprocess.run(
        [sys.executable, "bench/long_sequence.py", "--smoke", "--json", str(out_json)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = {r["config"]: r for r in json.loads(out_json.read_text())["runs"]}
    lengths = [runs[c]["longest_seq"] for c in ("plain", "+ chunked loss", "+ tiled MLP", "+ recomputation")]
    assert lengths == sorted(lengths) and lengths[-1] > 4 * lengths[0]  # each piece keeps or lengthens the sequence
    for r in runs.values():
        assert r["measured_bytes"] <= 16 * 2**20 and r["plan_vs_measured"] == pytest.approx(1.0, abs=0.25)

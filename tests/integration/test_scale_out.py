"""Scale-out on one machine: two "nodes" (two `deepspeed --no_ssh` launchers) and a Hydra multirun sweep.

Two launchers with ``--num_nodes 2 --node_rank 0/1``, one rank each, train together and give the same loss curve
as one launcher with two ranks; the overrides with brackets and ``${}`` reach the ranks unchanged, and the data
is tokenised by one node only (shared cache directory). The sweep runs four jobs as four deepspeed launches; two
fail on purpose and are reported while the other two finish and are ranked.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, launch_train, launch_two_nodes, read_jsonl

pytestmark = pytest.mark.integration

RUN = [
    "+exp=tiny_cpu",
    "train.max_steps=4",
    "train.micro_batch_size=4",
    "train.eval_every=0",
    "precision=fp32",
    "generate.num_prompts=2",
    "generate.before_training=false",
    "generate.max_new_tokens=2",
]


def test_two_nodes_train_like_one_node_with_two_ranks(tmp_path, tiny_pretrained):
    model = [f"model.path={tiny_pretrained}", "model.init=pretrained"]
    single = launch_train(RUN + model, tmp_path / "single", num_ranks=2)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]

    run_dir, cache = tmp_path / "two_nodes", tmp_path / "cache"
    overrides = RUN + model + [f"data.cache_dir={cache}", "wandb.tags=[node,two]", "run_name=two_${train.seed}"]
    nodes = launch_two_nodes(overrides, run_dir, tmp_path / "hosts")
    logs = [log for _, log in nodes]
    assert [code for code, _ in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]

    assert "2 data-parallel ranks = 8 examples per optimizer step" in logs[0]
    two = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    one = [r for r in read_jsonl(tmp_path / "single" / "metrics.jsonl") if "loss" in r]
    assert [r["batch_fingerprint"] for r in two] == [r["batch_fingerprint"] for r in one]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)

    config = (run_dir / "config.yaml").read_text()
    assert "run_name: two_42" in config and "  - node\n  - two\n" in config  # brackets and ${} arrived unchanged
    both = "".join(logs)
    assert both.count("preparing the token store") == 1, "each node prepared the shared data"  # one node did the work


def test_sweep_runs_each_job_as_its_own_launch_and_ranks_them(tmp_path):
    sweep_dir = tmp_path / "sweep"
    fixed = [o for o in RUN if not o.startswith("train.micro_batch_size=")]
    cmd = [
        sys.executable,
        "launch/sweep.py",
        "-m",
        *fixed,
        f"hydra.sweep.dir={sweep_dir}",
        "sweep.num_gpus=1",
        f"data.cache_dir={tmp_path / 'cache'}",  # tokenised by the first job, read by the others
        "train.lr=1e-3,3e-3",
        "train.micro_batch_size=4,100000",
    ]  # a batch larger than the data fails at start
    out = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    rows = json.loads((sweep_dir / "results.json").read_text())
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "failed (exit 2)", "ok", "failed (exit 2)"]
    assert all("do not fill one global batch" in r["error"] for r in rows if r["status"] != "ok")
    finished = [r for r in rows if r["status"] == "ok"]
    best = min(finished, key=lambda r: r["eval_loss"])
    assert [r["best"] for r in rows] == [r is best for r in rows]
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 4 for r in finished)
    assert (sweep_dir / "results.csv").read_text().count("\n") == 5
    assert f"best (eval_loss): job {best['job']}" in out.stdout and "job 1 failed (exit 2)" in out.stdout
    for r in finished:  # each job is a full run in its own directory, grouped in W&B under the sweep's name
        run_dir = sweep_dir / r["job"]
        assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "summary.json").is_file()
        config = (run_dir / "config.yaml").read_text()
        assert "group: sweep" in config and f"name: sweep-{r['job']}" in config
        assert "- train.lr=" in config and "- train.micro_batch_size=4" in config

"""A Hydra multirun sweep on one machine: three jobs as three deepspeed launches; one fails on purpose and is reported
while the other two finish and are ranked. (Two "nodes" on one machine: tests/integration/test_elastic_resume.py.)"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

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
    "report=false",
]


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
        "train.lr=3e-3",
        "train.micro_batch_size=4,100000,2",
    ]  # a batch larger than the data fails at start
    out = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    rows = json.loads((sweep_dir / "results.json").read_text())
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert [r["status"] for r in rows] == ["ok", "failed (exit 2)", "ok"]
    assert all("do not fill one global batch" in r["error"] for r in rows if r["status"] != "ok")
    finished = [r for r in rows if r["status"] == "ok"]
    best = min(finished, key=lambda r: r["eval_loss"])
    assert [r["best"] for r in rows] == [r is best for r in rows]
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 4 for r in finished)
    assert (sweep_dir / "results.csv").read_text().count("\n") == 4
    assert f"best (eval_loss): job {best['job']}" in out.stdout and "job 1 failed (exit 2)" in out.stdout
    for r in finished:  # each job is a full run in its own directory, grouped in W&B under the sweep's name
        run_dir = sweep_dir / r["job"]
        assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "summary.json").is_file()
        config = (run_dir / "config.yaml").read_text()
        assert "group: sweep" in config and f"name: sweep-{r['job']}" in config
        assert f"- train.micro_batch_size={4 if r['job'] == '0' else 2}" in config and "lr: 0.003" in config

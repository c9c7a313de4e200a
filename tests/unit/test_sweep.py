"""The sweep driver's pieces: swept keys, the per-job deepspeed command, result rows, ranking and the table."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest

from dtrain.config.schema import SweepConfig, SweepDirection
from dtrain.errors import EXIT_BAD_INPUT
from dtrain.sweep import (
    RESULT_FILE,
    collect_results,
    format_table,
    job_overrides,
    job_result,
    launcher_command,
    objective_value,
    swept_keys_of,
    swept_tags,
    write_results,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch"))
from sweep import driver_overrides  # noqa: E402


def test_swept_keys_are_the_ones_given_several_values():
    cli = ["+exp=tiny_cpu", "train.lr=1e-4,3e-4", "peft.r=range(8,17,8)", "data.files=[a,b]", "wandb.tags=[x]", "train.seed=1"]
    assert swept_keys_of(cli) == ["peft.r", "train.lr"]  # a list value is one value, not a sweep


def test_driver_keys_are_replaced_and_swept_values_become_tags():
    task = ["+exp=tiny_cpu", "train.lr=0.0001", "peft.r=8", "output_dir=/elsewhere", "wandb.group=mine"]
    assert job_overrides(task) == ["+exp=tiny_cpu", "train.lr=0.0001", "peft.r=8"]
    assert swept_tags(task, ["peft.r", "train.lr"]) == ["train.lr=0.0001", "peft.r=8"]


def test_launcher_command_passes_overrides_as_arguments_and_groups_the_run(tmp_path):
    sweep = SweepConfig(num_gpus=2, launcher_args=["--include", "localhost:0,1"])
    cmd = launcher_command(
        sweep, ["+exp=tiny_cpu", "data.files=[a,b]", "run_name=x_${train.seed}"], tmp_path / "3", "tiny_cpu-2026", ["train.lr=0.0001"]
    )
    assert cmd[0].endswith("deepspeed") and cmd[1:5] == ["--num_gpus", "2", "--include", "localhost:0,1"]
    assert cmd[5:8] == ["launch/train.py", "+exp=tiny_cpu", "data.files=[a,b]"]  # unchanged: no shell in between
    assert "run_name=x_${train.seed}" in cmd
    assert f"output_dir={tmp_path / '3'}" in cmd and "wandb.group=tiny_cpu-2026" in cmd and "wandb.name=tiny_cpu-2026-3" in cmd
    assert "wandb.tags=['train.lr=0.0001']" in cmd


def test_driver_adds_sweep_dir_callback_and_swept_keys_for_each_job():
    added = driver_overrides(["-m", "+exp=tiny_cpu", "train.lr=1e-4,3e-4", "peft.r=8,16"])
    assert any(a.startswith("hydra.sweep.dir=outputs/sweeps/${run_name}-") for a in added)
    assert "+hydra.callbacks.sweep_table._target_=dtrain.sweep.SweepTable" in added
    assert "+hydra.job.env_set.DTRAIN_SWEPT_KEYS='peft.r:train.lr'" in added
    own_dir = driver_overrides(["-m", "hydra.sweep.dir=/tmp/s", "train.lr=1,2"])
    assert not any(a.startswith("hydra.sweep.dir=") for a in own_dir) and not any("direction" in a for a in own_dir)
    optuna = driver_overrides(["-m", "hydra/sweeper=optuna", "train.lr=interval(1e-4,1e-2)"])
    assert "hydra.sweeper.direction=${sweep.direction}" in optuna and optuna[-2].endswith("='train.lr'")


def _finished_job(root: Path, name: str, eval_loss: float, tokens_per_s: list[float], exit_code: int = 0) -> dict:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"eval_loss": eval_loss, "accuracy_after": 0.5, "steps": 4}))
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "loss": 1.0, "tokens_per_s": v}) + "\n" for i, v in enumerate(tokens_per_s))
        + json.dumps({"eval_loss": eval_loss})
        + "\n"
    )
    (run_dir / "launcher.log").write_text("$ deepspeed ...\nsome output\n")
    row = job_result(run_dir, [f"train.lr={name}", "+exp=tiny_cpu"], exit_code, 12.0, [f"train.lr={name}"])
    (run_dir / RESULT_FILE).write_text(json.dumps(row))
    return row


def test_result_rows_ranking_and_files(tmp_path):
    a = _finished_job(tmp_path, "0", 1.50, [999.0, 100.0, 110.0])
    assert a["status"] == "ok" and a["eval_loss"] == 1.5 and a["steps"] == 4
    assert a["tokens_per_s"] == pytest.approx(105.0)  # the first (warm-up) step is left out
    _finished_job(tmp_path, "1", 1.20, [50.0, 60.0])
    failed_dir = tmp_path / "2"
    failed_dir.mkdir()
    (failed_dir / "launcher.log").write_text("$ deepspeed\ndtrain: error: 10 training examples do not fill one global batch\n")
    failed = job_result(failed_dir, ["train.micro_batch_size=100000"], 2, 3.0)
    (failed_dir / RESULT_FILE).write_text(json.dumps(failed))
    assert failed["status"] == "failed (exit 2)" and "do not fill one global batch" in failed["error"]
    assert math.isnan(objective_value(failed, "eval_loss", SweepDirection.minimize))
    _finished_job(tmp_path, "10", 1.30, [10.0])

    rows = collect_results(tmp_path, "eval_loss", SweepDirection.minimize)
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert [r["best"] for r in rows] == [False, True, False, False]
    by_speed = collect_results(tmp_path, "tokens_per_s", SweepDirection.maximize)
    assert [r["job"] for r in by_speed if r["best"]] == ["0"]

    table = format_table(rows, "eval_loss")
    best_line = next(line for line in table.splitlines() if line.startswith("*"))
    assert best_line.split()[1:3] == ["1", "train.lr=1"] and "1.2000" in best_line and "50.0%" in best_line
    assert "job 2 failed (exit 2): dtrain: error: 10 training examples" in table
    json_path, csv_path = write_results(tmp_path, rows)
    assert [r["job"] for r in json.loads(json_path.read_text())] == ["0", "1", "2", "10"]
    with csv_path.open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["best"] for r in csv_rows] == ["False", "True", "False", "False"] and csv_rows[2]["status"] == "failed (exit 2)"


def test_unknown_objective_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sweep.objective='loss'"):
        collect_results(tmp_path, "loss", SweepDirection.minimize)


def test_sweep_without_multirun_flag_says_how(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "launch/sweep.py", "+exp=tiny_cpu"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == EXIT_BAD_INPUT and "dtrain: error: launch/sweep.py runs sweeps: add -m" in out.stderr


def test_a_job_into_a_run_directory_another_job_holds_is_refused_without_a_launch(tmp_path, monkeypatch):
    import subprocess

    from dtrain.config import compose_job
    from dtrain.errors import EXIT_RUN_DIR_BUSY
    from dtrain.runlock import acquire_run_lock
    from dtrain.sweep import run_job

    lock = acquire_run_lock(tmp_path)  # a live job (this process) writes into the job's directory
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("launched into a busy run directory"))
    row = run_job(compose_job(["+exp=tiny_cpu"]), ["train.lr=1e-3"], tmp_path, "sweep", ["train.lr"], REPO)
    lock.release()
    assert row["status"] == f"failed (exit {EXIT_RUN_DIR_BUSY})" and row["exit_code"] == 16
    assert row["error"].startswith(f"dtrain: error: output_dir {tmp_path} is in use by another job (host ")

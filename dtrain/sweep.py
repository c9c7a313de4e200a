"""Hydra multirun sweeps where every job is its own ``deepspeed`` launch, and the sweep's results table.

``launch/sweep.py -m ...`` runs in one plain process (no process group). Hydra's launcher calls
``run_job`` once per job: locally it runs ``deepspeed --num_gpus N launch/train.py <the job's overrides>`` as a
subprocess and waits; with ``hydra/launcher=submitit_slurm`` the same function runs inside a SLURM job. A failed
job becomes a ``failed`` row instead of an exception, so the other jobs go on. At the end ``SweepTable`` (a Hydra
callback) gathers every job's ``sweep_result.json`` into ``results.csv`` / ``results.json`` in the sweep
directory, marks the best job and prints the table.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from dtrain.config.schema import JobConfig, SweepConfig, SweepDirection
from dtrain.dist import free_port
from dtrain.errors import EXIT_RUN_DIR_BUSY
from dtrain.metrics import StepRecord, read_metrics
from dtrain.runlock import run_dir_busy

RESULT_FILE = "sweep_result.json"
LAUNCHER_LOG = "launcher.log"
OBJECTIVES = ("eval_loss", "accuracy_after", "tokens_per_s")
# Overrides the driver sets for every job itself; the user's values for them would be overwritten.
DRIVER_KEYS = ("output_dir", "wandb.group", "wandb.name", "wandb.tags")
# The swept keys travel to each job (also a remote submitit job) through Hydra's ``hydra.job.env_set``.
SWEPT_KEYS_ENV = "DTRAIN_SWEPT_KEYS"


def job_overrides(task_overrides: list[str]) -> list[str]:
    """The job's own overrides, minus the keys the driver sets itself (its run directory, W&B group, name, tags)."""
    return [o for o in task_overrides if o.lstrip("+~").split("=", 1)[0] not in DRIVER_KEYS]


def swept_tags(task_overrides: list[str], swept_keys: list[str]) -> list[str]:
    """``key=value`` of the swept keys of this job: W&B tags, so runs can be filtered by value."""
    tags = []
    for override in task_overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in swept_keys:
            tags.append(f"{key}={value}")
    return tags


def swept_keys_of(cli_overrides: list[str]) -> list[str]:
    """Keys the command line gives several values (``train.lr=1e-4,3e-4``, ``range(...)``, ``choice(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(cli_overrides)
    return sorted(o.key_or_group for o in parsed if o.is_sweep_override())


def launcher_command(sweep: SweepConfig, overrides: list[str], run_dir: Path, group: str, tags: list[str]) -> list[str]:
    """The ``deepspeed`` command of one job. Arguments are passed as a list: nothing is re-quoted by a shell."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    tag_list = "[" + ",".join(_quote_for_hydra(t) for t in tags) + "]"
    return [
        str(deepspeed if deepspeed.exists() else "deepspeed"),
        "--num_gpus",
        str(sweep.num_gpus),
        *sweep.launcher_args,
        "launch/train.py",
        *overrides,
        f"output_dir={run_dir}",
        f"wandb.group={group}",
        f"wandb.name={group}-{run_dir.name}",
        f"wandb.tags={tag_list}",
    ]


def _quote_for_hydra(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_job(job: JobConfig, task_overrides: list[str], run_dir: Path, sweep_name: str, swept: list[str], repo_root: Path) -> dict[str, Any]:
    """Launch one job, wait for it, and write and return its result row (never raises for a failed job).

    Args:
        job: The job's composed config (for ``sweep.*``; the job itself re-composes it from the overrides).
        task_overrides: The job's Hydra overrides, as given to this job by the sweeper.
        run_dir: The job's run directory (a subdirectory of the sweep directory).
        sweep_name: The sweep directory's name: the W&B group of every job.
        swept: Keys the sweep varies (become W&B tags ``key=value``).
        repo_root: Where ``launch/train.py`` is.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = job_overrides(task_overrides)
    tags = swept_tags(task_overrides, swept)
    busy = run_dir_busy(run_dir)
    if busy:  # another live job writes there (a sweep started twice into one directory): refused, not launched
        row = job_result(run_dir, overrides, EXIT_RUN_DIR_BUSY, 0.0, tags)
        row["error"] = f"dtrain: error: {busy}"
        return row
    cmd = launcher_command(job.sweep, overrides, run_dir, sweep_name, tags)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The master port must differ between concurrent jobs on one node (e.g. a local joblib launcher).
    if not any(a.startswith("--master_port") for a in job.sweep.launcher_args):
        cmd[1:1] = ["--master_port", str(free_port())]
    timeout = 60 * job.sweep.timeout_minutes if job.sweep.timeout_minutes else None
    started = time.monotonic()
    with (run_dir / LAUNCHER_LOG).open("w") as log_file:
        log_file.write("$ " + " ".join(cmd) + "\n")
        log_file.flush()
        proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            exit_code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            exit_code = None
    row = job_result(run_dir, overrides, exit_code, time.monotonic() - started, tags)
    (run_dir / RESULT_FILE).write_text(json.dumps(row, indent=1) + "\n")
    return row


def _stop(proc: subprocess.Popen) -> None:
    """End a job that ran out of time: SIGTERM to its process group (ranks checkpoint and exit), then SIGKILL."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def job_result(
    run_dir: Path, overrides: list[str], exit_code: Optional[int], wall_s: float, swept: Optional[list[str]] = None
) -> dict[str, Any]:
    """One row of the table from what the job left in its run directory (``summary.json``, ``metrics.jsonl``)."""
    row: dict[str, Any] = {
        "job": run_dir.name,
        "swept": " ".join(swept or []),
        "overrides": " ".join(overrides),
        "status": "ok",
        "exit_code": exit_code,
        "eval_loss": None,
        "accuracy_after": None,
        "tokens_per_s": None,
        "steps": None,
        "wall_s": round(wall_s, 1),
        "run_dir": str(run_dir),
    }
    summary_path = run_dir / "summary.json"
    if exit_code == 0 and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        row.update(eval_loss=summary.get("eval_loss"), accuracy_after=summary.get("accuracy_after"), steps=summary.get("steps"))
        row["tokens_per_s"] = mean_tokens_per_s(read_metrics(run_dir).steps)
    else:
        row["status"] = "timeout" if exit_code is None else f"failed (exit {exit_code})"
        row["error"] = _last_error(run_dir / LAUNCHER_LOG)
    return row


def mean_tokens_per_s(steps: list[StepRecord]) -> Optional[float]:
    """Mean trained tokens/s over the steps, leaving out the first (start-up, compilation) when there are more."""
    values = [r.tokens_per_s for r in steps if r.tokens_per_s is not None]
    values = values[1:] if len(values) > 1 else values
    return sum(values) / len(values) if values else None


def _last_error(path: Path) -> str:
    """The job's own error line (``dtrain: error: ...``), else the launcher log's last non-empty line."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.is_file() else []
    for line in reversed(lines):
        if "dtrain: error:" in line or "Error" in line:
            return line[-500:]
    return lines[-1][-500:] if lines else "no output"


def objective_value(row: dict[str, Any], objective: str, direction: SweepDirection) -> float:
    """The value a sweeper optimises; a failed job gets NaN (Optuna marks such a trial failed)."""
    value = row.get(objective)
    if row["status"] != "ok" or value is None or not math.isfinite(value):
        return math.nan
    return float(value)


def collect_results(sweep_dir: Path, objective: str, direction: SweepDirection) -> list[dict[str, Any]]:
    """Every job's row under ``sweep_dir``, in job order, with ``best`` set on the best finished job."""
    if objective not in OBJECTIVES:
        raise ValueError(f"sweep.objective={objective!r}: use one of {', '.join(OBJECTIVES)}")
    rows = [json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{RESULT_FILE}")]
    rows.sort(key=lambda r: (len(r["job"]), r["job"]))  # 0, 1, ..., 10 in numeric order
    scored = [(objective_value(r, objective, direction), i) for i, r in enumerate(rows)]
    scored = [(v, i) for v, i in scored if not math.isnan(v)]
    for r in rows:
        r["best"] = False
    if scored:
        pick = min if direction == SweepDirection.minimize else max
        rows[pick(scored)[1]]["best"] = True
    return rows


COLUMNS = ("job", "swept", "status", "eval_loss", "accuracy_after", "tokens_per_s", "wall_s")
FORMATS = {"eval_loss": "{:.4f}", "accuracy_after": "{:.1%}", "tokens_per_s": "{:,.0f}", "wall_s": "{:.0f}"}


def format_table(rows: list[dict[str, Any]], objective: str) -> str:
    """A plain-text table, the best job marked with ``*``, failed jobs with their error below."""

    def cell(column: str, value: Any) -> str:
        if value is None or value == "":
            return "-"
        return FORMATS[column].format(value) if column in FORMATS else str(value)

    table = [["", *COLUMNS]] + [["*" if r["best"] else "", *(cell(c, r.get(c)) for c in COLUMNS)] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
    best = next((r for r in rows if r["best"]), None)
    failed = [r for r in rows if r["status"] != "ok"]
    lines.append(f"best ({objective}): job {best['job']} ({best['run_dir']})" if best else "best: none (no job finished)")
    lines += [f"job {r['job']} {r['status']}: {r.get('error', '')} (log: {r['run_dir']}/{LAUNCHER_LOG})" for r in failed]
    return "\n".join(lines)


def write_results(sweep_dir: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """``results.json`` (every field) and ``results.csv`` (the table's columns + best) in the sweep directory."""
    json_path, csv_path = sweep_dir / "results.json", sweep_dir / "results.csv"
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["best", *COLUMNS, "exit_code", "overrides", "run_dir"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a core dependency
    Callback = object


class SweepTable(Callback):
    """Hydra callback: after the last job, write and print the sweep's results table."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_results(sweep_dir, config.sweep.objective, SweepDirection(config.sweep.direction))
        json_path, csv_path = write_results(sweep_dir, rows)
        print(
            f"\nsweep {sweep_dir.name}: {len(rows)} jobs, {sum(r['status'] == 'ok' for r in rows)} finished\n"
            f"{format_table(rows, config.sweep.objective)}\nresults: {csv_path} and {json_path}",
            flush=True,
        )

"""Sweep hyperparameters with Hydra multirun: every job is its own ``deepspeed`` launch, then one results table.

    python launch/sweep.py -m +exp=tiny_cpu train.lr=1e-4,3e-4 peft.r=8,16
    python launch/sweep.py -m +exp=7b_lora hydra/launcher=submitit_slurm train.lr=1e-4,2e-4   # each job a SLURM job
    python launch/sweep.py -m +exp=tiny_cpu hydra/sweeper=optuna hydra.sweeper.n_trials=8 'train.lr=interval(1e-4,1e-2)'

This process never joins a process group: Hydra's launcher calls ``main`` once per job, and ``main`` runs
``deepspeed --num_gpus <sweep.num_gpus> launch/train.py <the job's overrides>`` and waits for it. Each job's run
directory is ``<sweep dir>/<job number>``; the table goes to ``<sweep dir>/results.csv`` and ``results.json``.
All jobs share the W&B group named after the sweep directory and carry their swept values as tags.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dtrain.config import register_configs, to_job_config
from dtrain.errors import ConfigError, exit_on_error
from dtrain.sweep import SWEPT_KEYS_ENV, objective_value, run_job, swept_keys_of

REPO_ROOT = Path(__file__).resolve().parents[1]
MULTIRUN_FLAGS = ("-m", "--multirun")
DEFAULT_SWEEP_DIR = "hydra.sweep.dir=outputs/sweeps/${run_name}-${now:%Y-%m-%d_%H-%M-%S}"


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    with exit_on_error():
        return _run_one(to_job_config(cfg))


def _run_one(job) -> float:
    hydra_cfg = HydraConfig.get()
    swept = [key for key in os.environ.get(SWEPT_KEYS_ENV, "").split(":") if key]
    run_dir = Path(hydra_cfg.runtime.output_dir)
    print(f"[sweep] job {hydra_cfg.job.num}: {' '.join(hydra_cfg.overrides.task)}", flush=True)
    row = run_job(job, list(hydra_cfg.overrides.task), run_dir, Path(hydra_cfg.sweep.dir).name, swept, REPO_ROOT)
    print(f"[sweep] job {hydra_cfg.job.num}: {row['status']}, {job.sweep.objective}={row.get(job.sweep.objective)}", flush=True)
    return objective_value(row, job.sweep.objective, job.sweep.direction)


def driver_overrides(args: list[str]) -> list[str]:
    """What the driver adds to the command line: the sweep directory (unless given), the results-table callback,
    and the swept keys for each job's W&B tags."""
    overrides = [a for a in args if not a.startswith("-")]
    added = [] if any(a.startswith("hydra.sweep.dir=") for a in overrides) else [DEFAULT_SWEEP_DIR]
    added += [
        "hydra.sweep.subdir=${hydra.job.num}",
        "+hydra.callbacks.sweep_table._target_=dtrain.sweep.SweepTable",
        f"+hydra.job.env_set.{SWEPT_KEYS_ENV}='{':'.join(swept_keys_of(overrides))}'",
    ]
    if "hydra/sweeper=optuna" in overrides and not any(a.startswith("hydra.sweeper.direction=") for a in overrides):
        added.append("hydra.sweeper.direction=${sweep.direction}")  # Optuna optimises what the table ranks by
    return added


if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a in MULTIRUN_FLAGS for a in args):
        with exit_on_error():
            raise ConfigError(
                "launch/sweep.py runs sweeps: add -m (python launch/sweep.py -m +exp=tiny_cpu train.lr=1e-4,3e-4); "
                "one job is: deepspeed --num_gpus 2 launch/train.py +exp=..."
            )
    sys.argv = [sys.argv[0], *args, *driver_overrides(args)]
    register_configs()
    main()

"""Train one job on every rank of a DeepSpeed launch.

    deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu            # the embedded default, 2 CPU ranks
    deepspeed launch/train.py +exp=7b_zero3 model.path=/models/llama-2-7b data.path=/data/train.jsonl

Any Hydra override works (``train.lr=1e-4 zero=zero3 peft=lora``). Sweeps (``-m``) go through
``launch/sweep.py``, which starts one ``deepspeed`` launch per job.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from dtrain.config import register_configs, to_job_config
from dtrain.errors import ConfigError, Preempted, exit_on_error

MULTIRUN_FLAGS = ("-m", "--multirun")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N`` that the deepspeed launcher appends (LOCAL_RANK is in the env)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank":
            skip = True
        elif not arg.startswith("--local_rank="):
            out.append(arg)
    return out


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dtrain.dist import end_rank, exit_rank_on_error
    from dtrain.trainer import Trainer

    job = to_job_config(cfg)
    # dtrain's errors become one line and their exit code (dtrain/errors.py), not a traceback from every rank. Each
    # rank leaves by end_rank, after an error as after success: without the interpreter's teardown, which can abort in
    # the process group's threads and adds a second or two to every launch (dtrain/dist.py).
    with exit_rank_on_error():
        trainer = Trainer(job)
        try:
            summary = trainer.train()
        except Preempted:  # checkpoint complete on every rank: the scheduler may requeue the job
            trainer.close()
            raise
        trainer.close()
    if trainer.dist.is_main:
        print(f"\ntrained model: {summary['final_dir']}")
        if summary.get("report"):
            print(f"run report (loss, lr, grad norm, throughput, memory, samples): {summary['report']}")
    end_rank(0)


if __name__ == "__main__":
    args = strip_launcher_args(sys.argv[1:])
    if any(a in MULTIRUN_FLAGS for a in args):
        with exit_on_error():
            raise ConfigError("launch/train.py runs one job per launch; sweep with: python launch/sweep.py -m +exp=... key=a,b")
    sys.argv = [sys.argv[0], *args]
    register_configs()
    main()

"""Train one job on every rank of a DeepSpeed launch.

    deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu            # the embedded default, 2 CPU ranks
    deepspeed launch/train.py +exp=7b_zero3 model.path=/models/llama-2-7b data.path=/data/train.jsonl

Any Hydra override works (``train.lr=1e-4 zero=zero3 peft=lora``). Sweeps (``-m``) go through
``launch/sweep.py``, which starts one ``deepspeed`` launch per job.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from dtrain.config import register_configs, to_job_config
from dtrain.data import DataError
from dtrain.ds_config import ConfigError

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
    from dtrain.export import ExportError
    from dtrain.guard import TrainingError
    from dtrain.preemption import EXIT_PREEMPTED, Preempted
    from dtrain.trainer import Trainer

    job = to_job_config(cfg)
    try:
        trainer = Trainer(job, OmegaConf.to_yaml(cfg, resolve=True))
        try:
            summary = trainer.train()
        except Preempted as e:  # checkpoint complete on every rank: the scheduler may requeue the job
            print(f"dtrain: {e}; exit code {EXIT_PREEMPTED} (requeue)", file=sys.stderr)
            trainer.close()
            sys.exit(EXIT_PREEMPTED)
        trainer.close()
    except (ConfigError, DataError) as e:  # bad input: a clear message, not a traceback from every rank
        print(f"dtrain: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TrainingError, ExportError) as e:  # the run could not go on safely, or its output is wrong
        print(f"dtrain: error: {e}", file=sys.stderr)
        sys.exit(3)
    if trainer.dist.is_main:
        print(f"\ntrained model: {summary['final_dir']}")
        if summary.get("report"):
            print(f"run report (loss, lr, grad norm, throughput, memory, samples): {summary['report']}")


if __name__ == "__main__":
    args = strip_launcher_args(sys.argv[1:])
    if any(a in MULTIRUN_FLAGS for a in args):
        sys.exit("launch/train.py runs one job per launch; sweep with: python launch/sweep.py -m +exp=... key=a,b")
    sys.argv = [sys.argv[0], *args]
    register_configs()
    main()

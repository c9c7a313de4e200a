"""Convert a run's checkpoint to DeepSpeed's universal format, ahead of resuming it on another layout.

    python launch/convert_ckpt.py run_dir=outputs/llama7b
    python launch/convert_ckpt.py run_dir=outputs/llama7b checkpoint=outputs/llama7b/checkpoints/step_00001000 workers=8

A resume on another world size, node count or ZeRO stage converts by itself (``ckpt.reshard=auto``) on rank 0 while
the other ranks wait; converting here first, on a CPU node, keeps the GPUs of a large job from idling meanwhile.
The result (``<checkpoint>/universal``) is reused by every later resume.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dtrain.checkpoint import CKPT_DIRNAME, check_complete, find_resume_checkpoint
from dtrain.config import register_configs
from dtrain.config.schema import ConvertJobConfig
from dtrain.errors import ConfigError, exit_on_error
from dtrain.reshard import convert_to_universal


@hydra.main(config_path="../conf", config_name="convert_ckpt", version_base="1.3")
def main(cfg: DictConfig) -> None:
    job: ConvertJobConfig = OmegaConf.to_object(cfg)
    logging.basicConfig(level=logging.INFO, format="[dtrain] %(message)s")
    with exit_on_error():
        if job.checkpoint:
            checkpoint = Path(job.checkpoint).resolve()
            problem = check_complete(checkpoint) if checkpoint.is_dir() else f"{checkpoint} does not exist"
            if problem:
                raise ConfigError(f"checkpoint={job.checkpoint}: not a complete checkpoint: {problem}")
        else:
            checkpoint = find_resume_checkpoint(Path(job.run_dir).resolve() / CKPT_DIRNAME, "required")
        folder = convert_to_universal(checkpoint, job.workers)
    print(f"universal checkpoint: {folder}")


if __name__ == "__main__":
    register_configs()
    main()

"""Preview the training data: rendered text with trained tokens highlighted, or the exact tensors as JSON.

    python launch/preview.py +exp=tiny_cpu preview.n=3
    python launch/preview.py +exp=tiny_cpu data.packing=true preview.format=json preview.n=2

Runs in one process, loads no model: only the tokenizer and the data, resolved and batched exactly as training
does (``dtrain.resolve``, ``dtrain.data.loader``).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from dtrain.config import register_configs, to_job_config
from dtrain.data.preview import preview_job
from dtrain.errors import exit_on_error


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    job = to_job_config(cfg)
    with exit_on_error():
        print(preview_job(job, color=sys.stdout.isatty()))


if __name__ == "__main__":
    register_configs()
    main()

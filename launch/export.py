"""Re-export a finished run, e.g. merge a LoRA adapter into its base model.

    python launch/export.py run_dir=outputs/my_lora_run merge=true                 # -> outputs/my_lora_run/merged
    python launch/export.py run_dir=outputs/my_lora_run merge=true out_dir=/models/merged max_shard_size=2GB

One process on CPU; the merged folder is re-read and its logits compared with base + adapter before it is reported.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dtrain.config import register_configs
from dtrain.config.schema import ExportJobConfig
from dtrain.errors import ConfigError, exit_on_error
from dtrain.export import merge_lora_run, parse_size


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    job: ExportJobConfig = OmegaConf.to_object(cfg)
    logging.basicConfig(level=logging.INFO, format="[dtrain] %(message)s")
    run_dir = Path(job.run_dir).resolve()
    out_dir = Path(job.out_dir).resolve() if job.out_dir else run_dir / "merged"
    with exit_on_error():
        if not job.merge:
            raise ConfigError("nothing to do: <run_dir>/final is already the exported model; pass merge=true to merge a LoRA adapter")
        merge_lora_run(run_dir, out_dir, parse_size(job.max_shard_size))
    print(f"merged model: {out_dir}")


if __name__ == "__main__":
    register_configs()
    main()

"""Metrics sinks: ``metrics.jsonl`` in the run directory (no account needed) and W&B, on rank 0 only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from dtrain.config.schema import WandbConfig, WandbMode

log = logging.getLogger("dtrain")


class MetricsLogger:
    """Appends one JSON object per call to ``metrics.jsonl`` and mirrors it to W&B when enabled.

    Built on every rank so the trainer needs no rank checks; only rank 0's instance writes anything.
    """

    def __init__(self, run_dir: Path, is_main: bool, wandb_cfg: WandbConfig, run_config: dict[str, Any], run_name: str):
        self.is_main = is_main
        self._file = None
        self._wandb = None
        if not is_main:
            return
        self._file = (run_dir / "metrics.jsonl").open("a", buffering=1)
        if wandb_cfg.mode != WandbMode.disabled:
            self._wandb = _start_wandb(run_dir, wandb_cfg, run_config, run_name)

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            step = record.get("step")
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(run_dir: Path, cfg: WandbConfig, run_config: dict[str, Any], run_name: str) -> Optional[Any]:
    try:
        import wandb
    except ImportError:
        log.warning("wandb.mode=%s but wandb is not installed: metrics go to metrics.jsonl only", cfg.mode.value)
        return None
    # The key, if any, is read by wandb from the environment; it is never put into the config or the run files.
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group,
        name=cfg.name or run_name,
        tags=list(cfg.tags),
        config=run_config,
        dir=str(run_dir),
        mode=cfg.mode.value,
    )

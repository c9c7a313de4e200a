"""Metrics sinks: ``metrics.jsonl`` in the run directory (no account needed) and W&B, on rank 0 only."""

from __future__ import annotations

import json
import secrets
import logging
from pathlib import Path
from typing import Any, Optional

from dtrain.config.schema import WandbConfig, WandbMode

log = logging.getLogger("dtrain")


class MetricsLogger:
    """Appends one JSON object per call to ``metrics.jsonl`` and mirrors it to W&B when enabled.

    Built on every rank so the trainer needs no rank checks; only rank 0's instance writes anything.
    """

    def __init__(self, run_dir: Path, is_main: bool, wandb_cfg: WandbConfig, run_config: dict[str, Any], run_name: str,
                 resume_step: Optional[int] = None):
        """
        Args:
            resume_step: When resuming from a checkpoint of this step, records of later steps (written by the
                attempt that died after the checkpoint) are dropped, so the file describes one consistent run;
                W&B continues the same run id.
        """
        self.is_main = is_main
        self._file = None
        self._wandb = None
        if not is_main:
            return
        path = run_dir / "metrics.jsonl"
        if resume_step is not None and path.is_file():
            _drop_records_after(path, resume_step)
        elif path.is_file():  # a fresh start in a used run directory: keep the old curve apart, not mixed in
            path.replace(run_dir / "metrics.previous.jsonl")
            log.info("fresh start: the earlier metrics.jsonl was moved to metrics.previous.jsonl")
        self._file = path.open("a", buffering=1)
        if wandb_cfg.mode != WandbMode.disabled:
            self._wandb = _start_wandb(run_dir, wandb_cfg, run_config, run_name, resume=resume_step is not None)

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


def _drop_records_after(path: Path, step: int) -> None:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        log.info("metrics.jsonl: dropped %d record(s) after step %d (written after the checkpoint we resume from)", len(lines) - len(kept), step)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def _start_wandb(run_dir: Path, cfg: WandbConfig, run_config: dict[str, Any], run_name: str, resume: bool) -> Optional[Any]:
    try:
        import wandb
    except ImportError:
        log.warning("wandb.mode=%s but wandb is not installed: metrics go to metrics.jsonl only", cfg.mode.value)
        return None
    # One W&B run per run directory: a resumed job continues the curve of the run that wrote the checkpoint.
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    # The key, if any, is read by wandb from the environment; it is never put into the config or the run files.
    return wandb.init(
        id=run_id,
        resume="allow",
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group,
        name=cfg.name or run_name,
        tags=list(cfg.tags),
        config=run_config,
        dir=str(run_dir),
        mode=cfg.mode.value,
    )

"""What a run records, as types, and where it goes: ``metrics.jsonl`` (no account needed), W&B, TensorBoard.

A step returns a :class:`StepRecord`, an evaluation an :class:`EvalRecord`; :class:`MetricsLogger` feeds each to
every enabled sink the same way, on rank 0 only. Readers (the report, sweeps, ``bench/``, tests) go through
:func:`read_metrics` and read fields by attribute, so the schema is written down here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

from dtrain import faults
from dtrain.config.schema import WandbConfig, WandbMode
from dtrain.disk import is_no_space, no_space_error

log = logging.getLogger("dtrain")

METRICS_FILE = "metrics.jsonl"
PHASES = ("data", "forward", "backward", "optimizer")


@dataclass
class StepRecord:
    """One optimizer step, over all ranks (every count is global)."""

    step: int
    epoch: int
    loss: Optional[float]
    """Token-mean loss over every trained token of the global batch; null when not finite (see ``skipped``)."""
    lr: float
    grad_norm: Optional[float]
    """Global gradient norm before clipping."""
    tokens: int
    """Trained (loss-carrying) tokens."""
    input_tokens: int
    """Real tokens fed to the model (prompt + response, no padding)."""
    tokens_seen: int
    """Real tokens since the start of the run."""
    tokens_per_s: float
    input_tokens_per_s: float
    padding_efficiency: float
    """Real tokens / token slots of the step's micro-batches."""
    step_time_s: float
    samples_per_s: float
    batch_fingerprint: int
    """Sum of crc32 of the step's sample ids: equal fingerprints <=> the same examples (data order checks)."""
    tflops_per_gpu: float
    mfu: Optional[float]
    """Model FLOPs utilisation; null when the device's peak is unknown (CPU, unknown GPU)."""
    time_data_s: Optional[float] = None
    time_forward_s: Optional[float] = None
    """Phase times: measured on logged steps only on a GPU (they synchronise the device), else null."""
    time_backward_s: Optional[float] = None
    time_optimizer_s: Optional[float] = None
    skipped: Optional[str] = None
    """``nonfinite`` or ``overflow`` when the optimizer skipped the update; absent otherwise."""
    source_loss: Optional[dict[str, float]] = None
    """A mixture of several sources: token-mean loss of each source's trained tokens in the global batch (written
    as ``loss/<source>``; a source without a token in the step is absent)."""

    def phase_seconds(self, phase: str) -> Optional[float]:
        return getattr(self, f"time_{phase}_s")


@dataclass
class EvalRecord:
    """Token-mean loss over the whole eval split after ``step``."""

    step: int
    eval_loss: float
    eval_tokens: int
    source_eval_loss: Optional[dict[str, float]] = None
    """A mixture of several sources: the eval loss of each source (written as ``eval_loss/<source>``)."""


Record = Union[StepRecord, EvalRecord]


# Per-source losses are flat keys ``<prefix><source>``: one number per key for W&B panels and TensorBoard.
PER_SOURCE = {"source_loss": "loss/", "source_eval_loss": "eval_loss/"}


def record_to_dict(record: Record) -> dict[str, Any]:
    """The JSON object of one ``metrics.jsonl`` line (``skipped`` and per-source losses only when set)."""
    values = dataclasses.asdict(record)
    if values.get("skipped", 0) is None:
        del values["skipped"]
    for field_name, prefix in PER_SOURCE.items():
        if field_name in values:
            values.update({f"{prefix}{name}": loss for name, loss in (values.pop(field_name) or {}).items()})
    return values


def record_from_dict(values: dict[str, Any]) -> Optional[Record]:
    """A line of ``metrics.jsonl`` as its record; fields an older file lacks are None, unknown ones ignored."""
    kind = EvalRecord if "eval_loss" in values else StepRecord if "loss" in values else None
    if kind is None:
        return None
    known = {f.name: values.get(f.name) for f in fields(kind)}
    for field_name, prefix in PER_SOURCE.items():
        if field_name in known:
            per_source = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
            known[field_name] = per_source or None
    return kind(**known)


@dataclass
class RunMetrics:
    """Everything ``metrics.jsonl`` holds, in order."""

    steps: list[StepRecord]
    evals: list[EvalRecord]


def read_metrics(path: Path) -> RunMetrics:
    """Read a run's ``metrics.jsonl`` (a run directory or the file itself); a missing file reads as empty."""
    path = Path(path)
    path = path / METRICS_FILE if path.is_dir() else path
    steps, evals = [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            record = record_from_dict(json.loads(line)) if line.strip() and _parses(line) else None
            if isinstance(record, StepRecord):
                steps.append(record)
            elif isinstance(record, EvalRecord):
                evals.append(record)
    return RunMetrics(steps, evals)


def wandb_mode(configured: Optional[WandbMode]) -> WandbMode:
    """``wandb.mode`` when set, else what W&B's own ``WANDB_MODE`` says, else disabled (no account needed)."""
    if configured is not None:
        return configured
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    aliases = {"dryrun": WandbMode.offline, "run": WandbMode.online}
    if env in aliases:
        return aliases[env]
    return WandbMode(env) if env in WandbMode.__members__ else WandbMode.disabled


class MetricsLogger:
    """Writes every record to ``metrics.jsonl`` and to W&B / TensorBoard when enabled.

    Built on every rank so the trainer needs no rank checks; only rank 0's instance writes anything.
    """

    def __init__(
        self,
        run_dir: Path,
        is_main: bool,
        wandb_cfg: WandbConfig,
        run_config: dict[str, Any],
        run_name: str,
        resume_step: Optional[int] = None,
        tensorboard: bool = False,
    ):
        """
        Args:
            resume_step: When resuming from a checkpoint of this step, records of later steps (written by the
                attempt that died after the checkpoint) are dropped, so the file describes one consistent run;
                W&B continues the same run id.
            tensorboard: Also write TensorBoard event files under ``<run_dir>/tensorboard``.
        """
        self._sinks: list[Any] = []
        if not is_main:
            return
        path = run_dir / METRICS_FILE
        if resume_step is not None and path.is_file():
            _drop_records_after(path, resume_step)
        elif path.is_file():  # a fresh start in a used run directory: keep the old curve apart, not mixed in
            path.replace(run_dir / "metrics.previous.jsonl")
            log.info("fresh start: the earlier metrics.jsonl was moved to metrics.previous.jsonl")
        self._sinks.append(_JsonlSink(path))
        mode = wandb_mode(wandb_cfg.mode)
        if mode != WandbMode.disabled:
            run = _start_wandb(run_dir, wandb_cfg, mode, run_config, run_name, resume=resume_step is not None)
            if run is not None:
                self._sinks.append(_WandbSink(run))
        if tensorboard:
            self._sinks.append(_TensorBoardSink(run_dir / "tensorboard", purge_step=resume_step))

    failure: Optional[str] = None
    """Why ``metrics.jsonl`` stopped (a full disk): the trainer stops every rank at the next step boundary."""

    def log(self, record: Record) -> None:
        """Send one record to every sink; a full disk is remembered in ``failure`` (rank 0 cannot stop the other
        ranks alone) and the file is not written to again."""
        values = record_to_dict(record)
        for sink in list(self._sinks):
            try:
                sink.write(values)
            except Exception as e:
                if not is_no_space(e):
                    raise
                self.failure = str(no_space_error(getattr(e, "filename", None) or sink.path, "metrics.jsonl", len(json.dumps(values)) + 1))
                self._sinks.remove(sink)

    def summary(self, values: dict[str, Any]) -> None:
        for sink in self._sinks:
            sink.summary(values)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The plotted values of a record: numbers only (no step, no nulls, no skip reason)."""
    return {k: v for k, v in values.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _JsonlSink:
    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("a", buffering=1)
        self._records = 0

    def write(self, values: dict[str, Any]) -> None:
        line = json.dumps(values) + "\n"
        self._records += 1
        faults.no_space("metrics", self._records, None, self.path, line.encode(), lambda b: self._file.write(b.decode()))
        self._file.write(line)

    def summary(self, values: dict[str, Any]) -> None:
        pass  # summary.json is the file's counterpart

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as e:  # the last buffered bytes did not fit: the torn line is dropped on resume
            log.warning("closing %s: %s", self.path, e)


class _WandbSink:
    def __init__(self, run):
        self._run = run

    def write(self, values: dict[str, Any]) -> None:
        self._run.log(_numbers(values) | ({"skipped": values["skipped"]} if "skipped" in values else {}), step=values.get("step"))

    def summary(self, values: dict[str, Any]) -> None:
        self._run.summary.update(values)

    def close(self) -> None:
        self._run.finish()


class _TensorBoardSink:
    def __init__(self, folder: Path, purge_step: Optional[int]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise ImportError("tensorboard=true needs the tensorboard package: pip install 'dtrain[tensorboard]'") from e
        # purge_step: a resumed run drops the events written after its checkpoint, as metrics.jsonl does.
        self._writer = SummaryWriter(str(folder), purge_step=None if purge_step is None else purge_step + 1)

    def write(self, values: dict[str, Any]) -> None:
        group = "eval" if "eval_loss" in values else "train"
        for key, value in _numbers(values).items():
            self._writer.add_scalar(f"{group}/{key}", value, global_step=values.get("step"))

    def summary(self, values: dict[str, Any]) -> None:
        self._writer.add_text("summary", "\n".join(f"{k}: {v}" for k, v in values.items()))

    def close(self) -> None:
        self._writer.close()


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def _drop_records_after(path: Path, step: int) -> None:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    torn = bool(lines) and not _parses(lines[-1])
    if torn:  # a record cut short (a full disk, a kill mid-write)
        log.info("metrics.jsonl: dropped a record cut short: %r", lines[-1][:80])
        lines = lines[:-1]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        log.info(
            "metrics.jsonl: dropped %d record(s) after step %d (written after the checkpoint we resume from)", len(lines) - len(kept), step
        )
    elif not torn:
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _start_wandb(
    run_dir: Path, cfg: WandbConfig, mode: WandbMode, run_config: dict[str, Any], run_name: str, resume: bool
) -> Optional[Any]:
    try:
        import wandb
    except ImportError:
        log.warning("wandb.mode=%s but wandb is not installed: metrics go to metrics.jsonl only", mode.value)
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
        mode=mode.value,
    )

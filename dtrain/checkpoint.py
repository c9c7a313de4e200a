"""Resumable checkpoints: written under a temporary name, made visible only once complete on every rank.

Layout of ``<run_dir>/checkpoints``::

    step_00000040/              one complete checkpoint
        <DeepSpeed engine files>  model / ZeRO partitions / optimizer / lr scheduler, one set per rank
        rng_rank00000.json        each rank's python, numpy and torch RNG states
        trainer_state.json        step, sampler position, counters, the config that must not change
        tokenizer/                the tokenizer (and chat template) the data was made with
        COMPLETE.json             manifest (every file and its size), written last by rank 0 after a barrier
    step_00000050.partial/      a save in progress, or one that died: ignored on resume
    latest                      the tag of the newest complete checkpoint (replaced atomically)

Own state files are JSON. The engine files are DeepSpeed's (``torch.save`` pickles, loaded by DeepSpeed), so
only checkpoints this code wrote and completed are loaded: a folder without a valid manifest is never read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dtrain import faults
from dtrain.config.schema import CheckpointConfig, JobConfig
from dtrain.disk import format_bytes, free_bytes, is_no_space, looks_like_failed_write, no_space_error, plan_disk_use, publish_folder
from dtrain.dist import DistInfo, all_gather_objects, barrier, broadcast_object
from dtrain.errors import ConfigError, DiskFull, TrainingError
from dtrain.reshard import UNIVERSAL_DIR, UNIVERSAL_INFO, repair_optimizer_steps, saved_layout

log = logging.getLogger("dtrain")

CKPT_DIRNAME = "checkpoints"
MANIFEST = "COMPLETE.json"
POINTER = "latest"
PARTIAL_SUFFIX = ".partial"
_COMPLETE_NAME = re.compile(r"^step_\d+$")
_PARTIAL_NAME = re.compile(r"^step_\d+\.partial$")
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


@dataclass
class FoundCheckpoint:
    """A complete checkpoint to resume from, and its ``trainer_state.json``."""

    path: Path
    state: dict

    @property
    def layout(self) -> dict:
        """How the run that wrote it split its batch and model states (``dtrain.reshard.layout_of``)."""
        return saved_layout(self.state)


@dataclass
class TrainerState:
    """Where training stands; everything besides the engine that an exact resume needs."""

    step: int = 0
    """Optimizer steps taken (skipped ones included: each consumed a global batch)."""
    epoch: int = 0
    step_in_epoch: int = 0
    """The sampler position: the next step draws batch ``step_in_epoch`` of epoch ``epoch``'s order."""
    consumed_units: int = 0
    """Examples (or packed rows) drawn so far, over all ranks."""
    skipped_steps: int = 0
    bad_steps_in_a_row: int = 0
    real_tokens: int = 0
    token_slots: int = 0
    trained_tokens: int = 0
    recent_losses: list = field(default_factory=list)
    """The spike detector's window, so a resumed run warns exactly as the straight one would."""


def resume_key(job: JobConfig, world_size: int) -> dict[str, str]:
    """The settings a checkpoint is only valid for: model, data, global batch, seed, precision, LoRA.

    Learning rate, step counts, logging and eval settings are free to change between a save and a resume; so is the
    layout (world size, ZeRO stage, offload, micro-batch x accumulation split): ``dtrain.reshard`` handles it.
    """
    d, t = job.data, job.train
    key = {
        "model.path": job.model.path,
        "model.init": job.model.init,
        "data.path": d.path,
        # The mixture (sources, weights, per-source settings) sets which examples each step draws: the data position.
        "data.sources": json.dumps([_keyed(source) for source in d.sources], sort_keys=True, default=lambda v: getattr(v, "value", str(v))),
        "data.format": d.format,
        "data.eval_path": d.eval_path,
        "data.eval_fraction": d.eval_fraction,
        "data.max_seq_len": d.max_seq_len,
        "data.train_on": d.train_on,
        "data.truncation": d.truncation,
        "data.packing": d.packing,
        "data.group_by_length": d.group_by_length,
        "data.chat_template": d.chat_template,
        "data.end_of_turn_token": d.end_of_turn_token,
        "global_batch_size": t.micro_batch_size * t.grad_accum_steps * (world_size // job.parallel.sp_size),
        "train.seed": t.seed,
        "precision": job.precision.name,
        **{f"peft.{k}": v for k, v in asdict(job.peft).items()},
    }
    # Field mapping and template arguments (issue 22) change what each record becomes; keyed only when set, so a
    # checkpoint written before they existed still resumes.
    for name in MAPPING_FIELDS:
        if getattr(d, name):
            key[f"data.{name}"] = json.dumps(getattr(d, name), sort_keys=True)
    return {k: str(getattr(v, "value", v)) for k, v in key.items()}


MAPPING_FIELDS = ("messages_field", "role_key", "content_key", "roles", "chat_template_kwargs")


def _keyed(source) -> dict:
    """A source's settings as they key a checkpoint: the mapping fields only when set (see ``resume_key``)."""
    return {k: v for k, v in asdict(source).items() if k not in MAPPING_FIELDS or v is not None}


def config_hash(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- RNG states


def capture_rng() -> dict:
    """This process's RNG states as JSON-able values (no pickle)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def restore_rng(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))


def _bytes_tensor(b64: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------- finding


def step_of(path: Path) -> int:
    return int(path.name.removesuffix(PARTIAL_SUFFIX).split("_")[-1])


def check_complete(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint (None when it is): manifest present and every file intact."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return f"{manifest_file} is missing (the save did not finish)"
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        return f"{manifest_file} is unreadable ({e})"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def checkpoint_bytes(path: Path) -> Optional[int]:
    """The size of a complete checkpoint from its manifest (None without a readable one)."""
    try:
        return sum(json.loads((path / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError):
        return None


def list_checkpoints(root: Path) -> tuple[list[Path], list[Path]]:
    """(complete-looking folders, partial folders) under ``root``, oldest first."""
    if not root.is_dir():
        return [], []
    dirs = [p for p in root.iterdir() if p.is_dir()]
    partial = sorted((p for p in dirs if _PARTIAL_NAME.match(p.name)), key=step_of)
    complete = sorted((p for p in dirs if _COMPLETE_NAME.match(p.name)), key=step_of)
    return complete, partial


def find_resume_checkpoint(root: Path, mode: str) -> Optional[Path]:
    """The checkpoint to resume from under ``ckpt.resume=mode``, or None for a fresh start.

    Raises:
        ConfigError: ``required`` without a complete checkpoint, or a given path that is not one.
    """
    if mode == "never":
        return None
    if mode not in ("auto", "required"):
        path = Path(mode).expanduser().resolve()
        problem = check_complete(path) if path.is_dir() else f"{path} does not exist"
        if problem:
            raise ConfigError(f"ckpt.resume={mode}: not a complete checkpoint: {problem}")
        return path
    complete, partial = list_checkpoints(root)
    for p in partial:
        log.warning("ignoring incomplete checkpoint %s (its save never finished)", p)
    for path in reversed(complete):
        problem = check_complete(path)
        if problem is None:
            return path
        if mode == "required":
            raise ConfigError(f"ckpt.resume=required: the newest checkpoint is damaged: {problem}")
        log.warning("ignoring damaged checkpoint %s: %s", path, problem)
    if mode == "required":
        raise ConfigError(f"ckpt.resume=required but {root} holds no complete checkpoint; use ckpt.resume=auto to start fresh")
    return None


# ---------------------------------------------------------------------------------------------- saving / loading


def find_checkpoint(root: Path, cfg: CheckpointConfig, dist: DistInfo) -> Optional[FoundCheckpoint]:
    """The checkpoint ``ckpt.resume`` selects and its recorded state (None: a fresh start), the same on every rank.

    Rank 0 looks; the answer (or its error) is broadcast, so every rank resumes from the same checkpoint or raises
    the same error. Called before anything is written to the run directory.
    """
    choice = None
    if dist.is_main:
        try:
            path = find_resume_checkpoint(root, cfg.resume)
            choice = {"path": str(path), "state": json.loads((path / STATE_FILE).read_text())} if path else {"path": None}
        except ConfigError as e:
            choice = {"error": str(e)}
    choice = broadcast_object(choice)
    if "error" in choice:
        raise ConfigError(choice["error"])
    if choice["path"] is None:
        log.info("ckpt.resume=%s: starting fresh (no checkpoint to resume from in %s)", cfg.resume, root)
        return None
    return FoundCheckpoint(Path(choice["path"]), choice["state"])


class CheckpointManager:
    """Saves and restores engine + trainer state. Every method is called on every rank (collectives inside)."""

    def __init__(
        self, run_dir: Path, cfg: CheckpointConfig, dist: DistInfo, key: dict[str, str], exclude_frozen: bool, layout: Optional[dict] = None
    ):
        """
        Args:
            key: This run's ``resume_key``: a checkpoint written with other values is refused.
            layout: This run's ``dtrain.reshard.layout_of``, recorded in every checkpoint it writes.
        """
        self.root = run_dir / CKPT_DIRNAME
        self.cfg = cfg
        self.dist = dist
        self.key = key
        self.layout = layout or {}
        self.exclude_frozen = exclude_frozen
        self.last_saved_step: Optional[int] = None
        self.expected_bytes: Optional[int] = None
        """What the next save will need: the last checkpoint's size, or the planner's estimate before the first."""

    def plan_disk_use(self, job: JobConfig, shape, total_steps: int, store: Optional[Path]) -> None:
        """Take the planner's checkpoint size until a save tells the real one; rank 0 logs the run's disk needs
        (``dtrain.disk.plan_disk_use``: checkpoints kept at once, the export, the store) and warns when they do not fit."""
        self.expected_bytes = plan_disk_use(job, shape, total_steps, self.root.parent, store, self.dist.is_main)

    def save(self, engine, tokenizer, state: TrainerState) -> Path:
        """Write ``step_<N>`` for ``state.step``; visible (manifest + pointer) only after every rank has written.

        Raises:
            DiskFull: on every rank, before writing when the filesystem cannot hold another checkpoint of the
                last one's size, or after a write failed for space (the ``.partial`` folder is removed).
        """
        tag = f"step_{state.step:08d}"
        final = self.root / tag
        partial = self.root / f"{tag}{PARTIAL_SUFFIX}"
        problem = None
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # leftover of a save that died at this same step
            problem = self._space_problem(partial, state.step)
        # Sync point: rank 0's verdict on the free space reaches every rank, so all stop or all write.
        problem = broadcast_object(problem)
        if problem:
            raise DiskFull(problem, every_rank=True)
        failure = self._write(engine, tokenizer, state, partial)
        # Sync point: every rank's engine files and RNG state are on disk (or every rank learns whose write failed)
        # before rank 0 declares the save complete.
        failures = [f for f in all_gather_objects(failure) if f]
        if failures:
            if self.dist.is_main:
                shutil.rmtree(partial, ignore_errors=True)  # frees what it held; `latest` still names the last one
            kind, message = failures[0]
            raise (DiskFull if kind == "disk" else TrainingError)(message, every_rank=True)
        problem = self._commit_and_prune(partial, final, state.step) if self.dist.is_main else None
        # Sync point: nobody reads or deletes checkpoints while rank 0 is renaming.
        problem = broadcast_object(problem)
        if problem:
            raise DiskFull(problem, every_rank=True)
        self.last_saved_step = state.step
        size = broadcast_object(checkpoint_bytes(final) if self.dist.is_main else None)
        self.expected_bytes = size or self.expected_bytes
        log.info("checkpoint %s complete (%s)", final, format_bytes(size))
        return final

    def _write(self, engine, tokenizer, state: TrainerState, partial: Path) -> Optional[tuple[str, str]]:
        """This rank's files of the checkpoint into ``partial``; returns why a write failed (None: all written)."""
        try:
            try:
                with faults.engine_writes_fail(engine, state.step, self.dist.rank):
                    # client_state: what DeepSpeed's universal converter needs, so any checkpoint can resume on another layout.
                    engine.save_checkpoint(
                        str(self.root),
                        tag=partial.name,
                        save_latest=False,
                        client_state=UNIVERSAL_INFO,
                        exclude_frozen_parameters=self.exclude_frozen,
                    )
            except Exception as e:
                if not looks_like_failed_write(e):
                    raise
                # The ranks whose files were written wait in DeepSpeed's closing barrier: meet them there.
                barrier()
                return self._write_failure(e, partial, state.step)
            _write_json(partial / f"rng_rank{self.dist.rank:05d}.json", capture_rng())
            faults.maybe_crash_in_save(state.step, self.dist.rank)
            if self.dist.is_main:
                payload = {
                    "format": FORMAT_VERSION,
                    "config_hash": config_hash(self.key),
                    "config_key": self.key,
                    "world_size": self.dist.world_size,
                    "layout": self.layout,
                    **asdict(state),
                }
                _write_json(partial / STATE_FILE, payload)
                tokenizer.save_pretrained(partial / "tokenizer")
        except OSError as e:
            if not is_no_space(e):
                raise
            return self._write_failure(e, partial, state.step)
        return None

    def _commit_and_prune(self, partial: Path, final: Path, step: int) -> Optional[str]:
        """Rank 0: make the save visible and drop old ones; returns why it could not (None: done)."""
        try:
            self._commit(partial, final)
        except OSError as e:  # the manifest or the pointer did not fit: the folder stays .partial
            if not is_no_space(e):
                raise
            return str(no_space_error(e.filename or partial, f"the manifest of checkpoint step {step}", None))
        self._prune(keep=final)
        return None

    def _space_problem(self, partial: Path, step: int) -> Optional[str]:
        """Why checkpoint ``step`` cannot be written (None: it fits), judged on rank 0 before anything is written."""
        if not self.expected_bytes:
            return None
        free = free_bytes(self.root)
        if free >= self.expected_bytes:
            return None
        return str(no_space_error(partial, f"checkpoint step {step} (the size of the last one)", self.expected_bytes, free))

    def _write_failure(self, error: BaseException, partial: Path, step: int) -> tuple[str, str]:
        """("disk" or "other", the message) for a failed write of checkpoint ``step`` on this rank."""
        path = getattr(error, "filename", None) or partial
        free = free_bytes(self.root)
        if is_no_space(error) or (self.expected_bytes and free < self.expected_bytes):
            message = str(no_space_error(path, f"checkpoint step {step} (rank {self.dist.rank})", self.expected_bytes, free))
            return "disk", message + f"; the checkpoint {self.root / POINTER} names is complete and kept"
        return "other", f"writing checkpoint step {step} failed on rank {self.dist.rank} ({path}): {error}"

    def _commit(self, partial: Path, final: Path) -> None:
        files = {str(f.relative_to(partial)): f.stat().st_size for f in sorted(partial.rglob("*")) if f.is_file()}
        _write_json(partial / MANIFEST, {"files": files})
        publish_folder(partial, final)  # a fresh run (resume=never) saving over an old step swaps it
        tmp = self.root / f"{POINTER}.tmp"
        tmp.write_text(final.name + "\n")
        os.replace(tmp, self.root / POINTER)
        _fsync_dir(self.root)

    def _prune(self, keep: Path) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints (never ``keep``), and dead partial saves."""
        complete, partial = list_checkpoints(self.root)
        for p in partial:
            log.info("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
        if self.cfg.keep_last <= 0:
            return
        valid = [p for p in complete if check_complete(p) is None]
        for old in valid[: max(0, len(valid) - self.cfg.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def find(self) -> Optional[FoundCheckpoint]:
        return find_checkpoint(self.root, self.cfg, self.dist)

    def check(self, found: FoundCheckpoint) -> None:
        """Refuse a checkpoint written with other settings (``resume_key``), unless ``ckpt.force_resume``."""
        old = found.state.get("config_key", {})
        if "global_batch_size" not in old:  # written before the layout could change: derive it
            old = {**old, "global_batch_size": str(saved_layout(found.state)["global_batch_size"])}
        changed = {k: (old.get(k), v) for k, v in self.key.items() if old.get(k) != v}
        if not changed:
            return
        lines = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in sorted(changed.items()))
        if self.cfg.force_resume:
            log.warning("resuming from %s despite changed settings (ckpt.force_resume=true): %s", found.path, lines)
            return
        raise ConfigError(
            f"the checkpoint {found.path} was written with different settings ({lines}); resuming would not continue the "
            "same run. Use a new output_dir (or ckpt.resume=never), or ckpt.force_resume=true to resume anyway"
        )

    def choose(self) -> Optional[Path]:
        """:meth:`find`, then :meth:`check`: the checkpoint to resume from, or None."""
        found = self.find()
        if found is not None:
            self.check(found)
        return found.path if found else None

    def restore(self, engine, path: Path, universal: bool = False, seed: int = 0) -> TrainerState:
        """Load checkpoint ``path`` into ``engine`` and this process's RNGs (every rank).

        Args:
            universal: Load ``<path>/universal`` (``dtrain.reshard``), made for another layout; the engine must have
                been built with ``checkpoint.load_universal``.
            seed: ``train.seed``: when the world size changed, per-rank RNG states cannot map rank to rank, so they are
                derived from (seed, step, rank) instead.
        """
        load_dir, tag = (path, UNIVERSAL_DIR) if universal else (path.parent, path.name)
        load_path, _ = engine.load_checkpoint(
            str(load_dir), tag=tag, load_module_strict=not self.exclude_frozen, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise ConfigError(f"DeepSpeed could not load the engine state from {load_dir / tag}")
        if universal:
            untied, made_tensor = repair_optimizer_steps(engine)
            if untied:
                log.info("the optimizer states loaded into ZeRO-3 shared one Adam step counter: each has its own copy now")
            if made_tensor:
                log.info("the checkpoint's Adam step counters were CPU Adam's plain numbers (offload): made tensors for AdamW")
        saved = json.loads((path / STATE_FILE).read_text())
        state = TrainerState(**{k: saved[k] for k in TrainerState.__dataclass_fields__ if k in saved})
        rng_file = path / f"rng_rank{self.dist.rank:05d}.json"
        if rng_file.is_file() and saved["world_size"] == self.dist.world_size:
            restore_rng(json.loads(rng_file.read_text()))
        else:
            derived = (seed * 1_000_003 + state.step * 1_009 + self.dist.rank) % 2**32
            random.seed(derived), np.random.seed(derived), torch.manual_seed(derived)
            log.warning(
                "rank %d: RNG states derived from (train.seed, step %d, rank): the world size changed, so dropout "
                "masks differ from the original run's",
                self.dist.rank,
                state.step,
            )
        self.last_saved_step = state.step
        self.expected_bytes = checkpoint_bytes(path) or self.expected_bytes
        log.info(
            "resumed from %s%s: step %d (epoch %d, batch %d of the epoch)",
            path,
            " (universal)" if universal else "",
            state.step,
            state.epoch,
            state.step_in_epoch,
        )
        return state


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

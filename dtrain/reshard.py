"""Elastic resume: continue a run on another number of GPUs or nodes, or another ZeRO stage, from its checkpoint.

    deepspeed --num_gpus 8 launch/train.py +exp=7b_zero3 ...          # saved on 16 GPUs: resumes here, same data order
    python launch/convert_ckpt.py run_dir=outputs/llama7b             # the conversion alone, ahead of the resume

A checkpoint's ZeRO partitions belong to the layout that wrote them (world size, stage, offload). When only the
layout changed, the checkpoint is converted once into DeepSpeed's universal format (``<checkpoint>/universal``,
one folder per parameter with its FP32 master, Adam moments and step), which loads into any data-parallel size and
ZeRO stage (``checkpoint.load_universal`` in the DeepSpeed JSON). The global batch stays what it was: the
accumulation steps are recomputed for the new world size. The data position is the global step, and every step's
examples depend only on the seed, the global batch and the step (``StepSampler``), so each step trains exactly the
examples it would have trained without the change.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from dtrain.config.schema import JobConfig
from dtrain.errors import ConfigError

log = logging.getLogger("dtrain")

UNIVERSAL_DIR = "universal"
UNIVERSAL_DONE = "CONVERTED"
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
"""The client state every dtrain checkpoint carries so that DeepSpeed's converter accepts it."""
PARTITION_KEYS = ("world_size", "zero.stage", "zero.offload_optimizer", "zero.offload_params")
"""What decides how the engine files are partitioned: a change here needs the universal conversion."""


def layout_of(job: JobConfig, world_size: int, nodes: int = 1) -> dict[str, Any]:
    """How a run splits its global batch and its model states (free to change between a save and a resume).

    ``nodes`` is recorded so that the start-up log says when it changed; at the same world size the partitions are
    the same and the checkpoint loads as it is.
    """
    t, z = job.train, job.zero
    return {
        "world_size": world_size,
        "nodes": nodes,
        "zero.stage": z.stage,
        "zero.offload_optimizer": z.offload_optimizer,
        "zero.offload_params": z.offload_params,
        "train.micro_batch_size": t.micro_batch_size,
        "train.grad_accum_steps": t.grad_accum_steps,
        "global_batch_size": t.micro_batch_size * t.grad_accum_steps * (world_size // job.parallel.sp_size),
    }


def saved_layout(state: dict[str, Any]) -> dict[str, Any]:
    """The layout a checkpoint's ``trainer_state.json`` records (older ones: read from their settings key)."""
    if "layout" in state:
        return state["layout"]
    key = state.get("config_key", {})
    micro, accum = int(key.get("train.micro_batch_size", 0)), int(key.get("train.grad_accum_steps", 0))
    world = int(state.get("world_size", key.get("world_size", 0)))
    return {
        "world_size": world,
        "zero.stage": int(key.get("zero.stage", -1)),
        "train.micro_batch_size": micro,
        "train.grad_accum_steps": accum,
        "global_batch_size": micro * accum * world,
    }


def layout_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (saved.get(k), v) for k, v in now.items() if k != "global_batch_size" and k in saved and saved[k] != v}


def needs_conversion(changes: dict[str, tuple[Any, Any]]) -> bool:
    return any(k in changes for k in PARTITION_KEYS)


def accumulation_for(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Accumulation steps that keep ``global_batch`` on ``world_size`` ranks at ``micro_batch`` per rank.

    Raises:
        ConfigError: No accumulation fits; the message lists the micro-batch/accumulation pairs that do.
    """
    per_rank, remainder = divmod(global_batch, world_size)
    if remainder == 0 and per_rank % micro_batch == 0:
        return per_rank // micro_batch
    if remainder:
        raise ConfigError(
            f"the checkpoint's global batch of {global_batch} cannot be split over {world_size} ranks; resume on a "
            f"number of ranks that divides {global_batch}, or start a new run (ckpt.resume=never)"
        )
    choices = ", ".join(f"micro_batch_size={m} grad_accum_steps={per_rank // m}" for m in range(1, per_rank + 1) if per_rank % m == 0)
    raise ConfigError(
        f"train.micro_batch_size={micro_batch} does not divide the checkpoint's global batch of {global_batch} over "
        f"{world_size} ranks ({per_rank} per rank); pick one of: {choices}"
    )


def universal_folder(checkpoint: Path) -> Path:
    return checkpoint / UNIVERSAL_DIR


def is_converted(checkpoint: Path) -> bool:
    return (universal_folder(checkpoint) / UNIVERSAL_DONE).is_file()


def convert_to_universal(checkpoint: Path, workers: int = 2) -> Path:
    """Convert ``checkpoint`` into ``<checkpoint>/universal`` once (one process; reused by later resumes).

    Written under a temporary name and renamed into place with its completion marker inside, so a conversion that
    dies midway leaves nothing a later resume takes for complete (the next one starts over).
    """
    target = universal_folder(checkpoint)
    if is_converted(checkpoint):
        log.info("universal checkpoint %s already converted: reused", target)
        return target
    for stale in checkpoint.glob(f"{UNIVERSAL_DIR}.partial*"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)  # a folder without its marker is not a conversion
    partial = checkpoint / f"{UNIVERSAL_DIR}.partial{os.getpid()}"
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(checkpoint),
        "--output_folder",
        str(partial),
        "--num_extract_workers",
        str(workers),
        "--num_merge_workers",
        str(workers),
        "--inject_missing_state",
    ]  # checkpoints from before dtrain saved the universal info
    log.info("converting %s to a universal checkpoint (DeepSpeed's ds_to_universal, %d workers)", checkpoint, workers)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
        raise ConfigError(f"converting {checkpoint} to a universal checkpoint failed: {lines[-1] if lines else out.returncode}")
    _model_states_under_both_names(partial)
    _optimizer_state_for_every_stage(partial / "zero" / "optimizer_state.pt")
    _parameter_files_for_every_stage(partial)
    (partial / UNIVERSAL_DONE).write_text("converted by dtrain with deepspeed.checkpoint.ds_to_universal\n")
    os.replace(partial, target)
    return target


MODEL_STATES_NAMES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _model_states_under_both_names(folder: Path) -> None:
    """The converter names the model-states file after the stage that wrote the checkpoint, the engine looks for the
    one of the stage that loads it. A universal load takes the weights from ``zero/`` and only metadata (schedule,
    client state) from this file, so either serves: the other name links to it."""
    present = [name for name in MODEL_STATES_NAMES if (folder / name).is_file()]
    if not present:
        return
    for name in MODEL_STATES_NAMES:
        if not (folder / name).exists():
            try:
                os.symlink(present[0], folder / name)  # relative: the folder can move
            except OSError:  # a filesystem without links
                shutil.copyfile(folder / present[0], folder / name)


def _optimizer_state_for_every_stage(path: Path) -> None:
    """The converter keeps the writing stage's layout of the optimizer's global state; ZeRO-1/2 read ``param_groups``
    at its top level, ZeRO-3 reads ``optimizer_state_dict`` (param groups and the step). Write both, from the same
    values (the step is each parameter's own ``step.pt``), so a checkpoint of any stage loads into any other."""
    import deepspeed
    import torch

    if not path.is_file():
        return
    state = torch.load(path, weights_only=False)
    nested = state.get("optimizer_state_dict")
    groups = state.get("param_groups") or (nested or {}).get("param_groups")
    if groups is None:
        return
    step_file = next(path.parent.glob("*/step.pt"), None)
    step = torch.load(step_file, weights_only=False) if step_file else None
    state.setdefault("param_groups", groups)
    if nested is None:
        state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": groups}
    state.setdefault("ds_version", deepspeed.__version__)  # ZeRO-3 keeps it elsewhere; ZeRO-1/2 require it here
    torch.save(state, path)


def _parameter_files_for_every_stage(folder: Path) -> None:
    """A ZeRO-3 checkpoint converts to flat tensors and keeps the Adam step in the global state; ZeRO-1/2 read
    ``{"param": tensor of the parameter's shape}`` and a ``step.pt`` per parameter. Write that form (ZeRO-3 reads
    it too): shapes from the model-states file, the step from the global state."""
    import torch

    states = folder / MODEL_STATES_NAMES[1]
    if not states.is_file():
        return
    shapes = {name: shape for group in torch.load(states, weights_only=False).get("param_shapes", []) for name, shape in group.items()}
    global_state = torch.load(folder / "zero" / "optimizer_state.pt", weights_only=False)
    step = global_state.get("optimizer_state_dict", {}).get("state", {}).get(0, {}).get("step")
    for name, shape in shapes.items():
        param_dir = folder / "zero" / name
        if not param_dir.is_dir():
            continue
        for tensor_file in param_dir.glob("*.pt"):
            value = torch.load(tensor_file, weights_only=False)
            if torch.is_tensor(value) and tensor_file.stem != "step":
                numel = torch.Size(shape).numel()
                torch.save({"param": value.reshape(-1)[:numel].reshape(shape)}, tensor_file)
        if step is not None and not (param_dir / "step.pt").exists():
            torch.save(step, param_dir / "step.pt")


def repair_optimizer_steps(engine: Any) -> tuple[int, int]:
    """Make the Adam step counters of a universal load what the loading optimizer counts with.

    Two DeepSpeed 0.19.8 behaviours need it. Its ZeRO-3 universal load
    (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) stores one ``step`` tensor in the state of every flat
    FP32 partition (one per parameter group and sub-group); torch's AdamW advances ``state["step"]`` in place, so with
    N partitions the shared counter ran N steps per optimizer step and Adam's bias correction was wrong from the first
    resumed update (full fine-tuning has a decay and a no-decay group: the losses drifted by ~6e-4 within four
    steps). Each state gets its own copy. And DeepSpeed's CPU Adam (optimizer offload) counts in a Python int, which
    the converter keeps, while torch's AdamW refuses anything but a tensor: a run saved with offload and resumed
    without it gets tensors (the same value; CPU Adam takes either, so the other direction needs nothing).

    Returns:
        (states whose shared step was copied, plain-number steps made tensors).
    """
    import torch

    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    wants_tensor = isinstance(base, torch.optim.Adam)  # torch's Adam and AdamW (DeepSpeed's torch_adam)
    seen, untied, made_tensor = set(), 0, 0
    for state in getattr(base, "state", {}).values():
        step = state.get("step")
        if step is None:
            continue
        if not torch.is_tensor(step):
            if wants_tensor:
                state["step"] = torch.tensor(float(step))  # torch's own counters are scalars of the default dtype
                made_tensor += 1
            continue
        if id(step) in seen:
            state["step"] = step.clone()
            untied += 1
        seen.add(id(state["step"]))
    return untied, made_tensor

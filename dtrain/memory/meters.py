"""Runtime memory meters: what a run really holds (engine tensors, gradients inside a step, activations, peaks).

Their figures go next to the plan (``dtrain.memory.plan``) in ``memory.json`` at the end of every run.
"""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("dtrain")


def measure_saved_bytes(fn, exclude=()) -> tuple[object, int]:
    """Run ``fn()`` and count the bytes autograd saves for backward (unique storages, parameters excluded).

    This is the activation memory of one forward: what stays alive until backward frees it.

    Returns:
        ``(fn's result, bytes)``.
    """
    import torch

    excluded = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())


def engine_state_bytes(engine) -> dict[str, int]:
    """Model-state bytes this rank really holds, read from the engine's own tensors (unique storages).

    ``params``: the module's parameters (the local ZeRO-3 partition when partitioned); ``optimizer``: the
    optimizer's state and the FP32 master partitions it steps. Offloaded tensors count under ``cpu_*``.
    Gradients are gone between steps: ``GradientMeter`` counts them inside one.
    """
    import torch

    seen: set[int] = set()
    out = {"params": 0, "optimizer": 0, "cpu_params": 0, "cpu_optimizer": 0}

    def add(kind: str, t) -> None:
        if not torch.is_tensor(t) or t.numel() == 0:
            return
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        out[("cpu_" if t.device.type == "cpu" and engine.device.type != "cpu" else "") + kind] += storage.nbytes()

    for p in engine.module.parameters():
        add("params", getattr(p, "ds_tensor", p))
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for master in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []):  # ZeRO-3 keeps them outside the step
        add("optimizer", master)
    for group in base.param_groups:
        for master in group["params"]:
            add("optimizer", master)
    for state in base.state.values():
        for value in state.values():
            for t in value.values() if isinstance(value, dict) else [value]:
                add("optimizer", t)
    return out


class GradientMeter:
    """Gradient bytes a rank holds at their peak within one optimizer step, read from the engine's tensors.

    DeepSpeed frees its gradient buffers inside ``engine.step()``, so ``engine_state_bytes`` at the end of a run
    sees none. Two moments of the first step are measured and the larger is kept:

    * end of the boundary's backward (ZeRO-1 only: that stage does not partition gradients, so every rank holds
      the whole accumulated ``.grad`` of each parameter until the engine reduces it after ``loss.backward()``);
    * the update: the reduced low-precision partitions (counted before ``engine.step()``) plus the FP32 gradient
      copies the optimizer reads (counted by a step pre-hook). Both are alive together while ZeRO converts
      one into the other; a copy that is the same storage (FP32 training) counts once.

    The reduce buckets are buffers, planned under "other", and not counted.
    """

    def __init__(self, engine):
        self.engine = engine
        self.bytes = {"grads": 0, "cpu_grads": 0}
        self.done = False
        self._moment: dict[str, int] = {}
        self._seen: set[int] = set()
        self._hook = None

    def _add(self, t) -> None:
        import torch

        if not torch.is_tensor(t) or t.numel() == 0 or t.untyped_storage().data_ptr() in self._seen:
            return
        self._seen.add(t.untyped_storage().data_ptr())
        offloaded = t.device.type == "cpu" and self.engine.device.type != "cpu"
        key = "cpu_grads" if offloaded else "grads"
        self._moment[key] = self._moment.get(key, 0) + t.untyped_storage().nbytes()

    def _close_moment(self) -> None:
        if sum(self._moment.values()) > sum(self.bytes.values()):
            self.bytes = {"grads": 0, "cpu_grads": 0, **self._moment}
        self._moment, self._seen = {}, set()

    def watch_backward(self, loss) -> None:
        """Under ZeRO-1, count the module's gradients in an end-of-backward callback of ``loss``'s backward."""
        import torch

        if self.engine.zero_optimization_stage() >= 2 or not loss.requires_grad:
            return

        def count_module_grads() -> None:
            for p in self.engine.module.parameters():
                self._add(p.grad)
            self._close_moment()

        def on_loss_grad(grad):
            torch.autograd.Variable._execution_engine.queue_callback(count_module_grads)
            return grad

        loss.register_hook(on_loss_grad)

    def before_step(self) -> None:
        """Count the reduced gradients now, and arm the in-step count of the next optimizer step."""
        zero_optimizer = self.engine.optimizer
        for p in self.engine.module.parameters():
            self._add(p.grad)
        # This rank's reduced partitions: ZeRO-1/2 keep them as views per group, ZeRO-3 in one flat buffer.
        for views in (getattr(zero_optimizer, "averaged_gradients", None) or {}).values():
            for view in views or []:
                self._add(view)
        self._add(getattr(zero_optimizer, "grad_partitions_flat_buffer", None))
        base = getattr(zero_optimizer, "optimizer", zero_optimizer)
        self._hook = base.register_step_pre_hook(self._in_step)

    def _in_step(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for master in group["params"]:
                self._add(master.grad)

    def after_step(self) -> None:
        """Close the measurement (call right after the boundary's ``engine.step()``)."""
        if self._hook is not None:
            self._hook.remove()
        self._close_moment()
        self._hook, self.done = None, True


def peak_memory_bytes() -> dict[str, int]:
    """Peak CUDA memory allocated on this rank's GPU, or this process's peak RSS on a CPU run."""
    import resource

    import torch

    if torch.cuda.is_available():
        return {"peak_cuda_allocated": int(torch.cuda.max_memory_allocated()), "peak_cuda_reserved": int(torch.cuda.max_memory_reserved())}
    return {"peak_rss": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def gpu_capacity_bytes_here() -> Optional[int]:
    """Memory of this rank's GPU, or ``None`` on a CPU run."""
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None


def measure_activations(loss_fn, batch: dict, engine, job, shape) -> tuple[object, dict]:
    """One forward under saved-tensor hooks: the activation bytes of this micro-batch, next to the plan's.

    Returns:
        ``(loss_fn(batch), figures)`` with the micro-batch's shape, measured and planned bytes.
    """
    from dtrain.memory.plan import DTYPE_BYTES, activation_bytes

    loss_sum, saved = measure_saved_bytes(lambda: loss_fn(batch), exclude=list(engine.module.parameters()))
    rows, width = batch["input_ids"].shape
    sp = job.parallel.sp_size
    # What autograd saves, wherever it is kept: offloaded layer inputs are saved too (hooks see them first), and
    # the all-to-all and tile buffers are transient, never saved. ``width`` is this rank's piece of the rows.
    planned = activation_bytes(
        shape,
        rows,
        width * sp,
        DTYPE_BYTES[job.precision.name],
        job.model.gradient_checkpointing,
        job.peft.r if job.peft.uses_adapters else 0,
        job.peft.uses_adapters and job.peft.dropout > 0,
        include_recompute=False,
        loss_chunk_size=job.train.loss_chunk_size,
        head_trainable=not job.peft.uses_adapters,
        sp_size=sp,
        tiled_mlp=job.model.tiled_mlp,
        include_transient=False,
    )
    figures = {"micro_batch": rows, "seq_len": width, "measured_bytes": saved, "planned_bytes": planned}
    log.info(
        "activations of one %d x %d micro-batch: measured %.1f MiB saved for backward, planned %.1f MiB",
        rows,
        width,
        saved / 2**20,
        planned / 2**20,
    )
    return loss_sum, figures

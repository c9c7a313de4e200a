"""What to change after a CUDA out-of-memory error: the dominant component, then configs that would fit."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from dtrain.config.schema import JobConfig
from dtrain.memory.plan import GiB, ModelShape, plan_for_job, setup_from_job


def oom_suggestions(
    job: JobConfig, shape: ModelShape, world_size: int, gpus_per_node: int, capacity: Optional[int]
) -> list[tuple[str, int, Optional[bool]]]:
    """``(overrides, planned bytes per GPU, fits)`` for each change, ordered by expected speed (fastest first).

    Shorter rows and smaller micro-batches cost nothing per token; recomputation costs ~1/3 more compute; a higher
    ZeRO stage adds communication; offload moves work to the CPU; LoRA changes what is trained.
    """
    setup = setup_from_job(job)
    micro, accum, seq = job.train.micro_batch_size, job.train.grad_accum_steps, job.data.max_seq_len
    candidates = []
    if seq > 256:
        candidates.append((f"data.max_seq_len={seq // 2}", setup, micro, seq // 2))
    if micro > 1:
        candidates.append((f"train.micro_batch_size={micro // 2} train.grad_accum_steps={accum * 2}", setup, micro // 2, seq))
    if not setup.gradient_checkpointing:
        candidates.append(("model.gradient_checkpointing=true", replace(setup, gradient_checkpointing=True), micro, seq))
    if setup.zero < 3:
        candidates.append((f"zero=zero{setup.zero + 1}", replace(setup, zero=setup.zero + 1), micro, seq))
    if not setup.offload_optimizer:
        stage = max(2, setup.zero)
        candidates.append((f"zero=zero{stage}_offload", replace(setup, zero=stage, offload_optimizer=True), micro, seq))
    if setup.zero == 3 and not setup.offload_params and setup.peft != "qlora":
        candidates.append(("zero=zero3_offload", replace(setup, offload_optimizer=True, offload_params=True), micro, seq))
    if setup.peft == "none":
        candidates.append(("peft=lora", replace(setup, peft="lora"), micro, seq))
        candidates.append(("peft=qlora", replace(setup, peft="qlora"), micro, seq))
    out = []
    for overrides, s, m, q in candidates:
        plan = plan_for_job(
            job, shape, s, world_size=world_size, gpus_per_node=gpus_per_node, capacity_bytes=capacity, micro_batch=m, seq_len=q
        )
        out.append((overrides, plan.per_gpu_bytes["total"], plan.fits))
    return out + long_sequence_suggestions(job, shape, world_size, gpus_per_node, capacity)


def long_sequence_suggestions(
    job: JobConfig, shape: ModelShape, world_size: int, gpus_per_node: int, capacity: Optional[int]
) -> list[tuple[str, int, Optional[bool]]]:
    """The long-sequence switches not yet on, each alone, at the run's sequence length: what makes a long row fit
    without shortening it (tiled MLP and chunked loss recompute little; sequence parallelism adds all-to-alls;
    activation offload adds host copies)."""
    setup = setup_from_job(job)
    candidates = []
    if not setup.tiled_mlp:
        candidates.append(("model.tiled_mlp=true", job, replace(setup, tiled_mlp=True)))
    if job.train.loss_chunk_size is None:
        candidates.append(("train.loss_chunk_size=4096", replace(job, train=replace(job.train, loss_chunk_size=4096)), setup))
    if setup.sp_size < world_size and shape.heads % world_size == 0:
        candidates.append((f"parallel.sp_size={world_size}", job, replace(setup, sp_size=world_size)))
    if not setup.activation_offload:
        offload = replace(setup, activation_offload=True, gradient_checkpointing=True)
        extra = "" if setup.gradient_checkpointing else "model.gradient_checkpointing=true "
        candidates.append((f"{extra}model.activation_offload=true", job, offload))
    out = []
    for overrides, j, s in candidates:
        plan = plan_for_job(j, shape, s, world_size=world_size, gpus_per_node=gpus_per_node, capacity_bytes=capacity)
        out.append((overrides, plan.per_gpu_bytes["total"], plan.fits))
    return out


def oom_report(
    job: JobConfig,
    shape: ModelShape,
    world_size: int,
    gpus_per_node: int,
    capacity: Optional[int],
    measured_peak: Optional[int],
    rank: int,
    step: int,
) -> str:
    """The message a run stops with after an out-of-memory error."""
    plan = plan_for_job(job, shape, world_size=world_size, gpus_per_node=gpus_per_node, capacity_bytes=capacity)
    parts = {k: v for k, v in plan.per_gpu_bytes.items() if k != "total"}
    dominant = max(parts, key=parts.get)
    cap = f" of {capacity / GiB:.1f} GiB" if capacity else ""
    peak = f"measured peak {measured_peak / GiB:.1f} GiB{cap}; " if measured_peak else ""
    lines = [
        f"out of memory on rank {rank} at step {step} ({peak}planned {plan.per_gpu_bytes['total'] / GiB:.1f} GiB per GPU, "
        f"{dominant} the largest part at {parts[dominant] / GiB:.1f} GiB: "
        + ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items())
        + ").",
        "Changes that lower it, fastest first (planned GiB per GPU):",
    ]
    for overrides, total, fits in oom_suggestions(job, shape, world_size, gpus_per_node, capacity):
        verdict = "" if fits is None else (" fits" if fits else " still too big")
        lines.append(f"  {overrides:<55} {total / GiB:7.1f}{verdict}")
    combined = first_fitting_combination(job, shape, world_size, gpus_per_node, capacity)
    if combined:
        lines.append(f"Together (keeping data.max_seq_len): {combined[0]}  ->  {combined[1] / GiB:.1f} GiB, fits")
    lines.append("Price any other combination with: python launch/plan.py <same overrides> plan.gpus=<GPUs per node>")
    return "\n".join(lines)


def first_fitting_combination(
    job: JobConfig, shape: ModelShape, world_size: int, gpus_per_node: int, capacity: Optional[int]
) -> Optional[tuple[str, int]]:
    """Apply the changes cumulatively in speed order (micro-batch 1, recomputation, next ZeRO stages, offload,
    LoRA, QLoRA) and return the first combination that fits, with its planned bytes."""
    if capacity is None:
        return None
    setup = setup_from_job(job)
    micro, accum = job.train.micro_batch_size, job.train.grad_accum_steps
    # The first change is the micro-batch (the setup stays); every later one keeps micro-batch 1.
    steps = [(f"train.micro_batch_size=1 train.grad_accum_steps={accum * micro}", lambda s: s)]
    steps.append(("model.gradient_checkpointing=true", lambda s: replace(s, gradient_checkpointing=True)))
    for stage in range(setup.zero + 1, 4):
        steps.append((f"zero=zero{stage}", lambda s, st=stage: replace(s, zero=st)))
    steps.append(("zero=zero3_offload", lambda s: replace(s, zero=3, offload_optimizer=True, offload_params=s.peft != "qlora")))
    if setup.peft == "none":
        steps.append(("peft=lora", lambda s: replace(s, peft="lora")))
        steps.append(("peft=qlora", lambda s: replace(s, peft="qlora", offload_params=False)))
    applied, current = [], setup
    for overrides, change in steps:
        current = change(current)
        applied = [a for a in applied if not (a.startswith("zero=") and overrides.startswith("zero="))] + [overrides]
        plan = plan_for_job(job, shape, current, world_size=world_size, gpus_per_node=gpus_per_node, capacity_bytes=capacity, micro_batch=1)
        if plan.fits:
            return " ".join(applied), plan.per_gpu_bytes["total"]
    return None

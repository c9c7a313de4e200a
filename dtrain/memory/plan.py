"""The memory planner: where GPU memory goes, before a run: parameters, gradients, optimizer states, activations, buffers.

Everything is computed from the model config (no weights) and the job config. Byte counts follow what the
code actually keeps (see docs/MEMORY.md for the derivation and how they were checked against measurement):

- parameters: every weight in the training dtype (QLoRA: linear weights packed 4 bits + quantisation constants),
  plus LoRA adapters; ZeRO-3 splits them over the data-parallel ranks, parameter offload moves them to CPU.
- gradients: trained parameters in the training dtype (split by ZeRO-2/3), plus the fp32 copy of this rank's
  partition that the optimizer step reads (bf16/fp16).
- optimizer: AdamW keeps an FP32 master copy, m and v (12 bytes per trained parameter; 8-bit AdamW: 4 + 2 + block
  scales); split by ZeRO-1/2/3, moved to CPU by optimizer offload.
- activations: the tensors autograd saves for backward, per decoder layer from the layer's shapes (the counts
  of a Hugging Face Llama layer under SDPA), plus the final norm and the fp32 log-softmax of the loss; with
  gradient checkpointing only each layer's input is kept, plus one layer recomputed during backward.
- other: DeepSpeed's communication buckets and the CUDA context.

No torch here: ``launch/plan.py`` prices 70B models on a laptop. What a run measures is in ``dtrain.memory.meters``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

from dtrain.config.schema import JobConfig, Precision
from dtrain.errors import ConfigError

GiB = 2**30
DTYPE_BYTES = {Precision.bf16: 2, Precision.fp16: 2, Precision.fp32: 4}
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
USABLE_FRACTION = 0.92
"""Share of a GPU's memory the plan lets a run fill (allocator fragmentation and NCCL buffers take the rest)."""
GPU_MEMORY_GB = {"A100-40GB": 40, "A100": 80, "A100-80GB": 80, "H100": 80, "H100-80GB": 80, "H200": 141, "L40S": 48, "A10G": 24}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on."""

    num_parameters: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_dims: Optional[int] = None
    """Sum of in + out features over every weight LoRA adapts, all layers (a fused expert weight counts experts x
    (in + out)): rank-r LoRA has r x this many parameters. None: the seven Llama linears of each block."""
    adapted_weights: Optional[int] = None
    """Weights of the layers LoRA adapts (QLoRA quantises them). None: the seven Llama linears of each block."""
    active_parameters: Optional[int] = None
    """Parameters one token uses (a mixture of experts runs only ``num_experts_per_tok`` experts). None: all."""

    @classmethod
    def from_hf_config(cls, config, num_parameters: int) -> ModelShape:
        heads = config.num_attention_heads
        return cls(
            num_parameters=num_parameters,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
        )

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linear layers of one block: q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def linear_parameters(self) -> int:
        """Weights of every block's linear layers (what QLoRA quantises and LoRA adapts)."""
        if self.adapted_weights is not None:
            return self.adapted_weights
        return self.layers * sum(a * b for a, b in self.linear_shapes)

    def lora_parameters(self, r: int) -> int:
        if self.lora_dims is not None:
            return r * self.lora_dims
        return self.layers * sum(r * (a + b) for a, b in self.linear_shapes)


@dataclass(frozen=True)
class PlanSetup:
    """One configuration the planner prices."""

    zero: int
    offload_optimizer: bool
    offload_params: bool
    peft: str  # none | lora | qlora
    gradient_checkpointing: bool
    optim: str = "adamw"
    sp_size: int = 1
    """Ranks that split each sequence (Ulysses sequence parallelism, ``parallel.sp_size``)."""
    tiled_mlp: bool = False
    activation_offload: bool = False

    @property
    def label(self) -> str:
        offload = "+offload(opt,params)" if self.offload_params else "+offload(opt)" if self.offload_optimizer else ""
        extras = (" ckpt" if self.gradient_checkpointing else "") + (" adamw8bit" if self.optim == "adamw_8bit" else "")
        extras += (f" sp{self.sp_size}" if self.sp_size > 1 else "") + (" tiled-mlp" if self.tiled_mlp else "")
        extras += " offload(act)" if self.activation_offload else ""
        return f"zero{self.zero}{offload} {self.peft}{extras}"


@dataclass
class MemoryPlan:
    setup: PlanSetup
    per_gpu_bytes: dict
    per_node_cpu_bytes: int
    capacity_bytes: Optional[int]
    per_rank_cpu_bytes: dict
    """What offload puts in host memory per rank, by component (params, grads, optimizer)."""

    @property
    def fits(self) -> Optional[bool]:
        if self.capacity_bytes is None:
            return None
        return self.per_gpu_bytes["total"] <= USABLE_FRACTION * self.capacity_bytes

    def as_dict(self) -> dict:
        return {
            **asdict(self.setup),
            "label": self.setup.label,
            "per_gpu_bytes": self.per_gpu_bytes,
            "per_node_cpu_bytes": self.per_node_cpu_bytes,
            "per_rank_cpu_bytes": self.per_rank_cpu_bytes,
            "capacity_bytes": self.capacity_bytes,
            "fits": self.fits,
        }


def layer_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """What one decoder layer saves for backward per token (see :func:`activation_bytes`)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    return dtype_bytes * (4 * i + 6 * h + 2 * kv) + 8 * h + 4 * shape.heads


def activation_bytes(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    dtype_bytes: int,
    checkpointing: bool,
    lora_r: int = 0,
    lora_dropout: bool = False,
    include_recompute: bool = True,
    loss_chunk_size: Optional[int] = None,
    head_trainable: bool = True,
    sp_size: int = 1,
    tiled_mlp: bool = False,
    activation_offload: bool = False,
    include_transient: bool = True,
) -> int:
    """Bytes autograd keeps on the GPU for one micro-batch's backward.

    Per token and decoder layer (Llama, SDPA): MLP gate/up/act/product (4 x intermediate), q/k/v/attention output,
    the normed inputs of q/k/v, o, and the MLP (6 x hidden + 2 x kv width) in the training dtype; the two RMSNorms
    save their input upcast to fp32 (8 x hidden bytes); attention keeps a log-sum-exp per head (4 bytes). LoRA
    adds each adapted input after dropout (and the dropout mask) and the rank-r projection. The final norm and
    the loss's fp32 log-softmax over the vocabulary come once.

    With ``loss_chunk_size`` the loss head (``dtrain/chunked_loss.py``) keeps no logits: it saves the gradient
    of the hidden states (b x hidden per token) and, when the head is trained and the tokens span several
    chunks, one fp32 vocab x hidden weight gradient.

    Long sequences (DeepSpeed's ALST pieces):

    - ``sp_size``: each rank holds ``seq_len / sp_size`` tokens of every row. Attention's all-to-all gathers the
      sequence for ``heads / sp_size`` heads, the same number of elements, so the saved tensors per local token
      are unchanged; the all-to-all adds transient send/receive buffers for q, k, v and the output of one layer.
    - ``tiled_mlp``: the MLP saves only its input (counted above) and recomputes tiles of about ``hidden`` tokens per
      row in backward: the ``4 x intermediate`` per token go, one tile's come back, once.
    - ``activation_offload`` (with checkpointing): the checkpointed layer inputs live in host memory
      (``offloaded_activation_bytes``); the GPU keeps about three layers' (the last, and two in flight).

    Args:
        include_recompute: With checkpointing, add the one layer that is recomputed during backward (the peak);
            without it, the figure is what is saved across the whole forward.
        loss_chunk_size: ``train.loss_chunk_size`` (None: plain logits).
        head_trainable: Whether the output head is trained (full fine-tuning) or frozen (LoRA).
        include_transient: Add the all-to-all and tile buffers (the peak); without them, what autograd saves.
    """
    tokens = micro_batch * math.ceil(seq_len / max(1, sp_size))
    h, b = shape.hidden, dtype_bytes
    layer = layer_bytes_per_token(shape, b)
    if lora_r:
        adapted_inputs = sum(a for a, _ in shape.linear_shapes)
        layer += adapted_inputs * (b + (1 if lora_dropout else 0)) + 7 * lora_r * b
    mlp_intermediates = 4 * shape.intermediate * b
    tiled_mlp = tiled_mlp and tokens // max(1, micro_batch) > h  # a row of one tile (``hidden`` tokens) runs whole
    if tiled_mlp:
        layer -= mlp_intermediates
    head = 4 * h + b * h + (b * h if loss_chunk_size else 4 * shape.vocab)
    if checkpointing:
        kept_inputs = min(shape.layers, 3) if activation_offload else shape.layers
        per_token = kept_inputs * b * h + head + (layer if include_recompute else 0)
    else:
        per_token = shape.layers * layer + head
    weight_grad = 4 * shape.vocab * h if loss_chunk_size and head_trainable and tokens > loss_chunk_size else 0
    transient = 0
    if tiled_mlp and include_transient:
        transient += micro_batch * min(h, tokens // max(1, micro_batch)) * mlp_intermediates
    if sp_size > 1 and include_transient:
        transient += 2 * tokens * (2 * h + 2 * shape.kv_heads * shape.head_dim) * b
    return tokens * per_token + weight_grad + transient


def offloaded_activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, dtype_bytes: int, sp_size: int = 1) -> int:
    """Host bytes per rank that activation offload holds: every checkpointed layer input of the micro-batch."""
    return micro_batch * math.ceil(seq_len / max(1, sp_size)) * shape.layers * shape.hidden * dtype_bytes


def plan_memory(
    shape: ModelShape,
    setup: PlanSetup,
    *,
    precision: Precision,
    micro_batch: int,
    seq_len: int,
    world_size: int,
    gpus_per_node: int,
    lora_r: int = 16,
    lora_dropout: bool = True,
    double_quant: bool = True,
    bucket_elements: int = 0,
    capacity_bytes: Optional[int] = None,
    loss_chunk_size: Optional[int] = None,
    on_gpu: bool = True,
) -> MemoryPlan:
    """Per-GPU bytes by component, and per-node CPU bytes, for one setup."""
    b = DTYPE_BYTES[precision]
    n = max(1, world_size)
    adapters = setup.peft in ("lora", "qlora")
    lora = shape.lora_parameters(lora_r) if adapters else 0
    trainable = lora if adapters else shape.num_parameters

    if setup.peft == "qlora":
        # 4 bits per weight + one absmax per 64 (fp32, or 8-bit with a second-level fp32 per 256 blocks).
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
        base = shape.linear_parameters * per_weight + (shape.num_parameters - shape.linear_parameters) * b
    else:
        base = shape.num_parameters * b
    # LoRA under ZeRO-3: the base is built inside zero.Init, so DeepSpeed casts nothing afterwards and peft's
    # adapters stay fp32; elsewhere the engine casts them to the training dtype (measured, see memory.json).
    adapter_bytes = 4 if setup.zero == 3 and setup.peft == "lora" else b
    params = base + lora * adapter_bytes
    if setup.zero == 3:
        params /= n
    # The update reads an FP32 copy of this rank's reduced partition (a flattened copy even in FP32 training),
    # made while the partition is alive. ZeRO-1 does not partition gradients during backward: its peak is
    # the whole accumulated gradient if that is larger.
    grads = trainable * (b + 4) / n
    if setup.zero == 1:
        grads = max(grads, trainable * b)
    optim_per_param = 12 if setup.optim == "adamw" else 4 + 2 + 8 / 256
    optimizer = trainable * optim_per_param / (n if setup.zero >= 1 else 1)
    activations = activation_bytes(
        shape,
        micro_batch,
        seq_len,
        b,
        setup.gradient_checkpointing,
        lora_r if adapters else 0,
        lora_dropout and adapters,
        loss_chunk_size=loss_chunk_size,
        head_trainable=not adapters,
        sp_size=setup.sp_size,
        tiled_mlp=setup.tiled_mlp,
        activation_offload=setup.activation_offload and setup.gradient_checkpointing,
    )
    other = 2 * bucket_elements * b + (CUDA_CONTEXT_BYTES if on_gpu else 0)
    if setup.zero == 3:
        largest_layer = max(shape.vocab * shape.hidden, sum(a * c for a, c in shape.linear_shapes))
        other += 2 * largest_layer * b  # gathered layer + prefetch of the next

    cpu = {"params": 0, "grads": 0, "optimizer": 0}
    if setup.activation_offload and setup.gradient_checkpointing:
        cpu["activations"] = offloaded_activation_bytes(shape, micro_batch, seq_len, b, setup.sp_size)
    if setup.offload_optimizer:
        # fp32 master, m and v live in host memory, and the gradient partitions are copied down for the CPU step.
        cpu["optimizer"], cpu["grads"] = int(optimizer), int(grads)
        optimizer, grads = 0.0, grads if setup.zero < 2 else 0.0
    if setup.offload_params:
        cpu["params"], params = int(params), 0.0
    per_gpu = {"params": params, "grads": grads, "optimizer": optimizer, "activations": activations, "other": other}
    per_gpu = {k: int(v) for k, v in per_gpu.items()}
    per_gpu["total"] = sum(per_gpu.values())
    return MemoryPlan(setup, per_gpu, sum(cpu.values()) * min(gpus_per_node, n), capacity_bytes, cpu)


def setup_from_job(job: JobConfig) -> PlanSetup:
    return PlanSetup(
        zero=job.zero.stage,
        offload_optimizer=job.zero.offload_optimizer,
        offload_params=job.zero.offload_params,
        peft=job.peft.method.value,
        gradient_checkpointing=job.model.gradient_checkpointing,
        optim=job.optim.name.value,
        sp_size=job.parallel.sp_size,
        tiled_mlp=job.model.tiled_mlp,
        activation_offload=job.model.activation_offload,
    )


def alternatives(chosen: PlanSetup) -> list[PlanSetup]:
    """The chosen setup first, then every ZeRO stage x offload x method x checkpointing variant."""
    variants = [chosen]
    for zero, offload, peft, ckpt in itertools.product((1, 2, 3), ("none", "opt", "opt+params"), ("none", "lora", "qlora"), (False, True)):
        if offload == "opt+params" and zero != 3:
            continue
        if peft == "qlora" and offload == "opt+params":
            continue
        s = replace(
            chosen,
            zero=zero,
            offload_optimizer=offload != "none",
            offload_params=offload == "opt+params",
            peft=peft,
            gradient_checkpointing=ckpt,
        )
        if s not in variants:
            variants.append(s)
    return variants


def plan_for_job(
    job: JobConfig,
    shape: ModelShape,
    setup: Optional[PlanSetup] = None,
    *,
    world_size: int,
    gpus_per_node: int,
    capacity_bytes: Optional[int],
    micro_batch: Optional[int] = None,
    seq_len: Optional[int] = None,
    on_gpu: bool = True,
    bucket_elements: int = 0,
) -> MemoryPlan:
    """:func:`plan_memory` with the job's precision, batch, sequence length and LoRA settings.

    Args:
        setup: Defaults to the job's own; ``micro_batch`` and ``seq_len`` override the job's.
    """
    return plan_memory(
        shape,
        setup or setup_from_job(job),
        precision=job.precision.name,
        micro_batch=micro_batch or job.train.micro_batch_size,
        seq_len=seq_len or job.data.max_seq_len,
        world_size=world_size,
        gpus_per_node=gpus_per_node,
        lora_r=job.peft.r,
        lora_dropout=job.peft.dropout > 0,
        double_quant=job.peft.double_quant,
        bucket_elements=bucket_elements,
        capacity_bytes=capacity_bytes,
        on_gpu=on_gpu,
        loss_chunk_size=job.train.loss_chunk_size,
    )


def plan_job(job: JobConfig, shape: ModelShape, world_size: int, gpus_per_node: int, capacity_bytes: Optional[int]) -> list[MemoryPlan]:
    """The chosen setup's plan and its alternatives' (same batch, sequence length, precision and world size)."""
    return [
        plan_for_job(job, shape, s, world_size=world_size, gpus_per_node=gpus_per_node, capacity_bytes=capacity_bytes)
        for s in alternatives(setup_from_job(job))
    ]


SEARCH_GRANULE = 1024


def longest_fitting_seq_len(
    job: JobConfig, shape: ModelShape, setup: PlanSetup, *, world_size: int, gpus_per_node: int, capacity_bytes: int, limit: int = 1 << 24
) -> int:
    """The longest multiple of 1024 tokens (micro-batch 1) whose plan fits ``capacity_bytes``; 0 if none does.

    Memory grows with the sequence length, so a bisection over multiples of 1024 up to ``limit`` finds it.
    """

    def fits(seq: int) -> bool:
        plan = plan_for_job(
            job, shape, setup, world_size=world_size, gpus_per_node=gpus_per_node, capacity_bytes=capacity_bytes, micro_batch=1, seq_len=seq
        )
        return bool(plan.fits)

    low, high = 0, limit // SEARCH_GRANULE
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid * SEARCH_GRANULE):
            low = mid
        else:
            high = mid - 1
    return low * SEARCH_GRANULE


def long_sequence_ladder(
    job: JobConfig, shape: ModelShape, *, world_size: int, gpus_per_node: int, capacity_bytes: int
) -> list[tuple[str, PlanSetup, int]]:
    """``plan.max_seq_len=search``: the longest sequence as configured, then with each long-sequence piece added in
    turn (recomputation, chunked loss, tiled MLP, activation offload, sequence parallelism over every GPU).

    Returns:
        ``(the overrides added so far, setup, longest fitting sequence length)`` per rung.
    """
    setup = setup_from_job(job)
    rungs: list[tuple[str, JobConfig, PlanSetup]] = [("(as configured)", job, setup)]

    def add(override: str, new_job: JobConfig, new_setup: PlanSetup) -> None:
        previous = rungs[-1][0] if len(rungs) > 1 else ""
        rungs.append(((previous + " " + override).strip(), new_job, new_setup))

    if not setup.gradient_checkpointing:
        add("model.gradient_checkpointing=true", rungs[-1][1], replace(rungs[-1][2], gradient_checkpointing=True))
    if job.train.loss_chunk_size is None:
        chunked = replace(job, train=replace(job.train, loss_chunk_size=4096))
        add("train.loss_chunk_size=4096", chunked, rungs[-1][2])
    if not setup.tiled_mlp:
        add("model.tiled_mlp=true", rungs[-1][1], replace(rungs[-1][2], tiled_mlp=True))
    if not setup.activation_offload:
        add("model.activation_offload=true", rungs[-1][1], replace(rungs[-1][2], activation_offload=True))
    if setup.sp_size < world_size and shape.heads % world_size == 0:
        add(f"parallel.sp_size={world_size}", rungs[-1][1], replace(rungs[-1][2], sp_size=world_size))
    return [
        (label, s, longest_fitting_seq_len(j, shape, s, world_size=world_size, gpus_per_node=gpus_per_node, capacity_bytes=capacity_bytes))
        for label, j, s in rungs
    ]


def format_plans(plans: list[MemoryPlan], limit: int = 12) -> str:
    """A table in GiB: the chosen setup first, then the others that fit (fastest-looking first)."""
    chosen, others = plans[0], plans[1:]
    others = sorted(others, key=_speed_rank)
    rows = [chosen] + [p for p in others if p.fits is not False][: limit - 1]
    cols = ("params", "grads", "optimizer", "activations", "other", "total")
    head = f"{'setup':<40}" + "".join(f"{c:>12}" for c in cols) + f"{'CPU/node':>11}  verdict"
    lines = [head]
    for p in rows:
        cells = "".join(f"{p.per_gpu_bytes[c] / GiB:>12.2f}" for c in cols)
        verdict = "" if p.fits is None else ("fits" if p.fits else "does not fit")
        mark = "* " if p is chosen else "  "
        lines.append(f"{mark + p.setup.label:<40}{cells}{p.per_node_cpu_bytes / GiB:>11.1f}  {verdict}")
    if chosen.fits is False:
        best = next((p for p in others if p.fits), None)
        lines.append(
            f"the chosen setup does not fit; it fits with: {best.setup.label}"
            if best
            else "no variant fits: shorten data.max_seq_len or lower train.micro_batch_size"
        )
    return "\n".join(lines)


def _speed_rank(plan: MemoryPlan) -> tuple:
    """Expected speed, fastest first: no offload, lower ZeRO stage, no recomputation, full fine-tuning kept."""
    s = plan.setup
    return (s.offload_params, s.offload_optimizer, s.gradient_checkpointing, s.zero, s.peft != "none")


def gpu_capacity_bytes(name: Optional[str], memory_gb: Optional[float]) -> Optional[int]:
    if memory_gb:
        return int(memory_gb * 10**9)
    if name is None:
        return None
    key = name.upper().replace(" ", "")
    for known, gb in GPU_MEMORY_GB.items():
        if key == known.upper():
            return int(gb * 10**9)
    raise ConfigError(f"plan.gpu={name}: unknown GPU; use one of {sorted(GPU_MEMORY_GB)} or set plan.gpu_memory_gb")


def plan_for_run(
    job: JobConfig, shape: ModelShape, world_size: int, local_world_size: int, ds_config: dict, capacity_bytes: Optional[int]
) -> MemoryPlan:
    """The plan of the configuration being run, with this machine's GPU capacity (``None``: a CPU run)."""
    zero = ds_config.get("zero_optimization", {})
    bucket = int(zero.get("reduce_bucket_size", 0)) if job.zero.stage < 3 else 0
    return plan_for_job(
        job,
        shape,
        world_size=world_size,
        gpus_per_node=local_world_size,
        capacity_bytes=capacity_bytes,
        on_gpu=capacity_bytes is not None,
        bucket_elements=bucket,
    )


def compare_plan(plan: MemoryPlan, measured: list[dict]) -> str:
    """One line per component: planned vs measured (rank 0's engine tensors; the peak over ranks)."""
    rank0 = measured[0]
    lines = []
    for kind in ("params", "grads", "optimizer"):
        got = rank0[kind] + rank0.get(f"cpu_{kind}", 0)
        want = plan.per_gpu_bytes[kind] + plan.per_rank_cpu_bytes[kind]
        lines.append(f"{kind:<10} planned {want / 2**20:10.2f} MiB   measured {got / 2**20:10.2f} MiB (rank 0's engine tensors)")
    peak_key = "peak_cuda_allocated" if "peak_cuda_allocated" in rank0 else "peak_rss"
    peak = max(m[peak_key] for m in measured)
    lines.append(
        f"{'total':<10} planned {plan.per_gpu_bytes['total'] / 2**20:10.2f} MiB   {peak_key} {peak / 2**20:10.2f} MiB (max over ranks)"
    )
    return "\n".join(lines)

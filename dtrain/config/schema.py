"""Typed configuration schemas.

Every YAML file under ``conf/`` is merged into these dataclasses at compose time, so an unknown key or
a value of the wrong type fails before any process group or model exists, with the key's name in
Hydra's message. The library only ever sees the dataclass objects (``OmegaConf.to_object`` once in
``launch/``), never a ``DictConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class ModelInit(str, Enum):
    """How model weights are obtained."""

    pretrained = "pretrained"  # from_pretrained(model.path): real weights
    random = "random"  # from_config(model.path): random weights, for smoke runs and benchmarks


class DataFormat(str, Enum):
    """Record layout of a source (README, "Data formats"); every one is read into the same conversation."""

    auto = "auto"  # detected per source from the fields of its first records (logged at start)
    messages = "messages"  # {"messages": [{"role": ..., "content": ..., "tool_calls": ...}, ...], "tools": ...} (OpenAI)
    sharegpt = "sharegpt"  # {"conversations": [{"from": "human", "value": ...}, ...], "system": ..., "tools": ...}
    prompt_completion = "prompt_completion"  # {"prompt": ..., "completion": ...}: strings, or lists of messages (TRL)
    text = "text"  # {"text": ...}: language modelling, every token trained
    alpaca = "alpaca"  # {"instruction": ..., "input": ..., "output": ...}


class TrainOn(str, Enum):
    """Which tokens carry loss."""

    assistant = "assistant"  # every assistant turn (content + its end-of-turn token)
    last_assistant = "last_assistant"  # only the final assistant turn
    all = "all"  # every token of the rendered conversation


class Truncation(str, Enum):
    """What happens to an example longer than ``data.max_seq_len``."""

    drop = "drop"  # skip it and count it
    truncate = "truncate"  # keep the prompt's head and the last assistant turn; dropped (and counted) if nothing trainable is left
    error = "error"  # stop before training, naming the example


class OnInvalid(str, Enum):
    """What happens to a malformed record."""

    error = "error"  # stop before training, naming the file, line and reason
    skip = "skip"  # skip it, count it per reason, report the counts (and still stop past max_invalid_fraction)


class LengthGrouping(str, Enum):
    """How examples of similar length are batched together when padding (``data.group_by_length``)."""

    none = "none"  # micro-batches in shuffled order
    within_step = "within_step"  # sort each step's examples by length before splitting them into micro-batches
    across_steps = "across_steps"  # also gather similar lengths into the same steps (changes what a step trains on)


class PeftMethod(str, Enum):
    none = "none"
    lora = "lora"
    qlora = "qlora"  # LoRA on a base quantised to 4 bits (bitsandbytes NF4) while loading


class OptimName(str, Enum):
    adamw = "adamw"  # DeepSpeed's (fused / CPU) AdamW, fp32 states
    adamw_8bit = "adamw_8bit"  # bitsandbytes 8-bit AdamW as a client optimizer: states in 8 bits (~1/4 the bytes)


class Precision(str, Enum):
    auto = "auto"  # decided at start from the machine (dtrain/resolve.py): bf16 where it is native, else fp16 or fp32
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Schedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    path: str = MISSING
    """Local folder or hub id passed to ``from_pretrained`` (or to ``AutoConfig`` when ``init=random``)."""
    init: ModelInit = ModelInit.pretrained
    attn_implementation: str = "auto"
    """``auto`` picks ``flash_attention_2`` when flash-attn imports and CUDA is present, else ``sdpa``."""
    gradient_checkpointing: bool = False
    tiled_mlp: bool = False
    """Run each decoder MLP over the sequence in tiles, recomputed in backward (DeepSpeed's TiledMLP): the MLP's
    activations of the whole sequence are never held (long sequences)."""
    tiled_mlp_tokens: Optional[int] = None
    """Tokens per row in one MLP tile; null: the model's hidden size (a tile's activations are then about the size
    of one MLP weight)."""
    activation_offload: bool = False
    """With ``gradient_checkpointing``: keep the checkpointed layer inputs in host memory between forward and
    backward (DeepSpeed's checkpoint offload; long sequences)."""
    trust_remote_code: bool = False
    """Only honoured together with a pinned ``revision`` (remote code runs on every rank)."""
    revision: Optional[str] = None
    config_path: Optional[str] = None
    """Where ``launch/plan.py`` reads the model's config.json when ``path`` is not reachable (bundled shapes of
    popular models: ``${dtrain_asset:configs/llama2_7b}``); training always uses ``path``."""
    allow_pickle_weights: bool = False
    """Weights load only from safetensors; set true to also accept pickled ``.bin`` files (they can run code)."""


@dataclass
class SourceConfig:
    """One source of a mixture (``data.sources``); unset fields take the value of ``data``."""

    path: str = MISSING
    """A .jsonl/.json/.parquet file, a folder of them, or a hub dataset id."""
    name: Optional[str] = None
    """Its name in the log, metrics.jsonl and W&B (``loss/<name>``); default: the file or folder name."""
    weight: float = 1.0
    """Examples drawn per epoch per example of the source: 2 trains each twice, 0.5 a seeded half of them, 0 none
    (eval only)."""
    format: Optional[DataFormat] = None
    split: Optional[str] = None
    train_on: Optional[TrainOn] = None
    chat_template: Optional[str] = None
    """Render this source with another template (a Jinja string or a .jinja file); the exported tokenizer keeps
    ``data.chat_template`` or its own."""
    max_examples: Optional[int] = None
    """Read only the first this many records of the source."""
    messages_field: Optional[str] = None
    """Field mapping (as ``data.messages_field`` ... ``data.roles``, which it replaces for this source)."""
    role_key: Optional[str] = None
    content_key: Optional[str] = None
    roles: Optional[Dict[str, str]] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    """Default template arguments of this source's records (as ``data.chat_template_kwargs``, which it replaces)."""


@dataclass
class DataConfig:
    """Where the examples come from and how they become token ids and labels."""

    path: Optional[str] = None
    """A .jsonl/.json/.parquet file, a folder of them, or a hub dataset id: a mixture of one source. Set this or
    ``sources``."""
    sources: List[SourceConfig] = field(default_factory=list)
    """A weighted mixture: each source with its own path, weight and optional format, split, train_on,
    chat_template, max_examples, field mapping and chat_template_kwargs."""
    format: DataFormat = DataFormat.auto
    """auto: each source's format is detected from the fields of its first records (and logged)."""
    messages_field: Optional[str] = None
    """Field mapping: the record field holding the conversation (default: ``messages``, ShareGPT ``conversations``)."""
    role_key: Optional[str] = None
    """Field mapping: the key of a message's role (default: ``role``, ShareGPT ``from``)."""
    content_key: Optional[str] = None
    """Field mapping: the key of a message's text (default: ``content``, ShareGPT ``value``)."""
    roles: Dict[str, str] = field(default_factory=dict)
    """Field mapping: the data's role names to dtrain's (``{human: user, gpt: assistant}``); targets are system,
    user, assistant, tool, and ShareGPT's function_call and observation. Added to the format's own map."""
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Default template arguments of every record (e.g. ``{enable_thinking: false}``); a record's own
    ``chat_template_kwargs`` win key by key."""
    eval_path: Optional[str] = None
    """Held-out file; when unset, ``eval_fraction`` of ``path`` is split off with ``train.seed``."""
    eval_fraction: float = 0.05
    split: str = "train"
    """Split name for hub datasets."""
    max_seq_len: int = 2048
    train_on: TrainOn = TrainOn.assistant
    truncation: Truncation = Truncation.drop
    """Text documents (``format=text``) longer than ``max_seq_len`` are cut into windows instead, and counted."""
    on_invalid: OnInvalid = OnInvalid.error
    max_invalid_fraction: float = 0.01
    """With ``on_invalid=skip``: stop anyway when more than this share of the records is invalid."""
    num_proc: Optional[int] = None
    """Processes that parse, render and tokenise in parallel (on the rank that prepares); null: this machine's cores."""
    cache_dir: Optional[str] = "~/.cache/dtrain/tokenized"
    """Prepared token stores live here, one folder per key (data files, tokenizer, data config, code); empty:
    prepare into a temporary folder every run."""
    prepared_path: Optional[str] = None
    """A token store written by ``launch/prepare.py`` (or to be written there, when missing); wins over
    ``cache_dir``. A store prepared from other settings is refused, naming them."""
    verify_store: bool = False
    """Re-read every file of the token store at start and compare its checksum with ``meta.json`` (a pass over
    the whole store; ``launch/prepare.py --verify`` does the same ahead of training). File sizes are always checked."""
    packing: Optional[bool] = None
    """Pack several examples per row up to ``max_seq_len`` (no padding, no attention across examples; a
    micro-batch is then that many rows). null (default): pack when the data is mixed-length, i.e. padded
    micro-batches of the training split, in shuffled order, would hold under 90% real tokens (decided and logged
    at start)."""
    group_by_length: LengthGrouping = LengthGrouping.within_step
    """within_step (default): each optimizer step draws the same shuffled examples as with ``none``, sorted by length
    before they are split into micro-batches and ranks. The loss is normalised over the whole global batch, so the
    step's gradient is unchanged; only padding goes down, when a rank runs several micro-batches per step.
    across_steps: also put similar lengths into the same steps (shuffled mega-batches of 64 steps): less padding
    still, but length-homogeneous steps slowed convergence several-fold on the bundled task (docs/BENCHMARKS.md).
    Packed rows are sorted the same way."""
    chat_template: Optional[str] = None
    """A Jinja string or a path to a .jinja file; wins over the tokenizer's own template."""
    end_of_turn_token: Optional[str] = None
    """Token that closes an assistant turn; defaults to the tokenizer's eos token."""


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (LoRA through peft)."""

    method: PeftMethod = PeftMethod.none
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Optional[List[str]] = None
    """Module names to adapt; ``None`` means every linear layer except the output head."""
    quant_type: str = "nf4"
    """qlora: the 4-bit data type (``nf4`` or ``fp4``)."""
    double_quant: bool = True
    """qlora: quantise the quantisation constants too (~0.4 bit/weight saved)."""

    @property
    def uses_adapters(self) -> bool:
        """LoRA or QLoRA: the base is frozen and only the adapter is trained, saved and exported."""
        return self.method in (PeftMethod.lora, PeftMethod.qlora)


@dataclass
class OptimConfig:
    """The optimizer (``optim=adamw|adamw_8bit``); betas, eps and weight decay are in ``train``."""

    name: OptimName = OptimName.adamw


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO stage and offload. ``template`` names a file in ``ds_configs/``."""

    stage: int = 2
    template: str = "zero2"
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class PrecisionConfig:
    """Mixed precision; bf16 and fp16 keep FP32 master weights inside DeepSpeed's optimizer."""

    name: Precision = Precision.auto
    """auto (default): bf16 on GPUs that compute it natively (compute capability 8.0+: A100, H100, L40S, ...), fp16
    with dynamic loss scaling on older GPUs, and on CPUs bf16 only with native support (AVX512-BF16 or AMX), else
    fp32 (a bf16 matmul ran 38x slower than fp32 on an AVX2-only CPU). The log says which and why, and
    ``config.yaml`` records the choice."""
    initial_scale_power: int = 16
    """fp16 only: dynamic loss scaling starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000


@dataclass
class TrainConfig:
    """The optimisation loop. Global batch = micro_batch_size x grad_accum_steps x data-parallel size (the world size,
    divided by ``parallel.sp_size``)."""

    epochs: int = 1
    max_steps: Optional[int] = None
    """Optimizer steps; overrides ``epochs`` when set."""
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    lr: float = 2e-5
    min_lr_ratio: float = 0.1
    schedule: Schedule = Schedule.cosine
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 42
    log_every: int = 1
    eval_every: int = 0
    """Run eval every N optimizer steps (0: only at the end)."""
    dist_timeout_minutes: float = 30.0
    """Timeout of start-up collectives (tokenisation on one rank while the others wait, model loading)."""
    step_timeout_minutes: float = 30.0
    """Timeout of every collective once training starts (covers the slowest step, eval and checkpoint save):
    a dead or stuck rank ends the job with an error naming the rank and step instead of a silent hang."""
    max_bad_steps: int = 5
    """Stop after this many consecutive optimizer steps skipped for a NaN/Inf loss or gradient norm."""
    loss_chunk_size: Optional[int] = None
    """Compute the loss from the last hidden states this many trained tokens at a time, so the full
    ``[tokens, vocab]`` float32 logits never exist (same loss and gradients; Liger's fused kernel on GPU when
    ``dtrain[liger]`` is installed). Worth it for large vocabularies (Llama 3: 128k); null: plain logits."""
    measure_activations: bool = False
    """Measure the bytes autograd saves in the first micro-batch's forward (saved-tensor hooks) and keep them
    next to the plan in memory.json. Under ZeRO-3 the figure also holds the gathered weights autograd keeps."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one GPU for MFU; default: looked up from the GPU's name (A100, H100, H200, ...)."""
    spike_factor: float = 10.0
    """Warn (with the sample ids) when a step's loss exceeds this multiple of the running median."""


@dataclass
class ParallelConfig:
    """How the ranks split the work beyond data parallelism."""

    sp_size: int = 1
    """Ulysses sequence parallelism: groups of this many consecutive ranks split each sequence between them (the
    attention heads are split instead for attention itself), so a sequence needs 1/sp_size of the activation memory
    per rank. The groups train the same examples; data parallelism is world size / sp_size, and the global batch is
    micro_batch_size x grad_accum_steps x (world size / sp_size). 1: off."""


class ReshardMode(str, Enum):
    auto = "auto"
    never = "never"


@dataclass
class CheckpointConfig:
    """Resumable checkpoints under ``<output_dir>/checkpoints``: engine state + trainer state + tokenizer."""

    every_steps: int = 0
    """Save every N optimizer steps (0: only at the end and on preemption)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted only after a newer one is complete."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint of the run directory, else a fresh start), ``never``, ``required``
    (stop when there is none), or the path of one checkpoint folder."""
    force_resume: bool = False
    """Resume even though the model, data, global batch, seed or precision changed."""
    reshard: ReshardMode = ReshardMode.auto
    """auto: a checkpoint written on another layout (world size, nodes, ZeRO stage, offload) is converted once to
    DeepSpeed's universal format and loaded into this one (``dtrain/reshard.py``); never: refuse it."""


class ExportVerify(str, Enum):
    auto = "auto"  # logits when the model has at most 3B parameters, else names and shapes only
    logits = "logits"  # reload the export on CPU and compare its logits with the engine's on one batch
    shapes = "shapes"  # every tensor present with its shape, read from the safetensors headers
    none = "none"


@dataclass
class ExportConfig:
    """The model written to ``<output_dir>/final`` (and by ``launch/export.py``)."""

    max_shard_size: str = "5GB"
    """Full fine-tuning writes safetensors shards of at most this size (HF naming + index)."""
    verify: ExportVerify = ExportVerify.auto


@dataclass
class GenerateConfig:
    """The generation check on held-out prompts that ends (and optionally starts) every run."""

    num_prompts: int = 8
    max_new_tokens: int = 64
    before_training: bool = False
    """Also generate before the first step, to report accuracy before vs after."""


@dataclass
class WandbConfig:
    mode: Optional[WandbMode] = None
    """online, offline or disabled; null (default): W&B's own ``WANDB_MODE`` decides, and without it W&B is off."""
    project: str = "dtrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


class PreviewFormat(str, Enum):
    text = "text"  # rendered text, trained tokens highlighted (colour on a terminal, [[brackets]] otherwise)
    json = "json"  # one object per example/row: input_ids, targets (next-token labels, -100 = no loss), position_ids when packed


@dataclass
class PreviewConfig:
    """``launch/preview.py``: what the model will see and be trained on, before any training."""

    n: int = 3
    format: PreviewFormat = PreviewFormat.text


class PlanFormat(str, Enum):
    text = "text"
    json = "json"


@dataclass
class PlanConfig:
    """``launch/plan.py``: the memory plan for ``gpus`` x ``nodes`` GPUs, without loading any weights."""

    gpus: int = 8
    """GPUs per node."""
    nodes: int = 1
    gpu: Optional[str] = "H100"
    """GPU model for the capacity (A100-40GB, A100, H100, H200, L40S, A10G); see gpu_memory_gb."""
    gpu_memory_gb: Optional[float] = None
    """Capacity per GPU in GB; wins over ``gpu``."""
    format: PlanFormat = PlanFormat.text
    max_seq_len: Optional[str] = None
    """``search``: instead of the plan at ``data.max_seq_len``, the longest sequence that fits (micro-batch 1) as
    configured and with each long-sequence piece added in turn (checkpointing, chunked loss, tiled MLP, activation
    offload, sequence parallelism over all GPUs)."""


class SweepDirection(str, Enum):
    minimize = "minimize"
    maximize = "maximize"


@dataclass
class SweepConfig:
    """``launch/sweep.py``: how each job of a Hydra multirun is launched and how the jobs are ranked."""

    num_gpus: int = 2
    """Ranks per job on its node (``deepspeed --num_gpus``; CPU ranks on a machine without GPUs)."""
    launcher_args: List[str] = field(default_factory=list)
    """More ``deepspeed`` launcher arguments, e.g. ``[--hostfile,hosts]`` or ``[--include,localhost:0,1]``."""
    objective: str = "eval_loss"
    """Which job result ranks the jobs (and Optuna's objective): eval_loss, accuracy_after, tokens_per_s."""
    direction: SweepDirection = SweepDirection.minimize
    timeout_minutes: Optional[float] = None
    """A job running longer is stopped and reported as failed (none: no limit)."""


@dataclass
class JobConfig:
    """Top-level schema of ``conf/train.yaml``."""

    output_dir: str = MISSING
    """One run directory shared by all ranks."""
    run_name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    report: bool = True
    """Draw ``<output_dir>/report.png`` at the end of the run (curves, memory, samples: 1-3 s on rank 0). Off for many
    short runs (tests, sweeps of smoke runs); ``python launch/report.py run_dir=...`` draws it later from the files."""
    tensorboard: bool = False
    """Also write every metric as TensorBoard events under ``<output_dir>/tensorboard`` (``pip install 'dtrain[tensorboard]'``)."""
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


@dataclass
class ExportJobConfig:
    """``launch/export.py``: re-export a finished run (e.g. merge its LoRA adapter into the base model)."""

    run_dir: str = MISSING
    """A run directory written by ``launch/train.py`` (holds ``config.yaml`` and ``final/``)."""
    merge: bool = False
    """LoRA runs: write base + adapter merged into one plain transformers model."""
    out_dir: Optional[str] = None
    """Default: ``<run_dir>/merged``."""
    max_shard_size: str = "5GB"


@dataclass
class ReportJobConfig:
    """``launch/report.py``: the run report PNG of one run directory, or several side by side."""

    run_dir: Optional[str] = None
    compare: List[str] = field(default_factory=list)
    """More run directories whose curves are overlaid on ``run_dir``'s."""
    out: Optional[str] = None
    """Default: ``<run_dir>/report.png`` (``report_compare.png`` with ``compare``)."""


@dataclass
class ConvertJobConfig:
    """``launch/convert_ckpt.py``: convert a run's checkpoint to DeepSpeed's universal format ahead of a resume."""

    run_dir: str = MISSING
    """A run directory written by ``launch/train.py`` (holds ``checkpoints/``)."""
    checkpoint: Optional[str] = None
    """One checkpoint folder to convert; default: the newest complete one of ``run_dir``."""
    workers: int = 2
    """Processes of DeepSpeed's converter (extraction and merging)."""

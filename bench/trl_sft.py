"""TRL's SFTTrainer on dtrain's model, data, DeepSpeed JSON and batch layout: the TRL half of bench/vs_trl.py.

    deepspeed --num_gpus 2 --master_port 31234 bench/trl_sft.py --ds-config outputs/tiny_cpu/ds_config.json \\
        --model /tmp/tiny_pretrained --data dtrain/assets/data/train.jsonl --max-seq-len 256 \\
        --micro-batch 16 --grad-accum 1 --steps 30 --lr 2e-3 --out /tmp/trl_run

What is held equal to a dtrain run (so that ``bench/vs_trl.py`` measures the trainers, not the set-ups):

- the DeepSpeed JSON that dtrain wrote (ZeRO section, precision, optimizer, clipping untouched; only the three
  batch keys and the optimizer's lr are set from the command line, which HF's Trainer insists match its own
  arguments);
- the weights (``--model``, loaded in the training dtype with torch SDPA, as dtrain loads them);
- the data and its masks: conversations rendered by the tokenizer's chat template with loss on every assistant
  turn (content + ``<|im_end|>``). TRL's ``assistant_only_loss`` needs ``{% generation %}`` markers, so the
  tokenizer gets a marked copy of its ChatML template; it must render every example to the same text as the
  original (checked), and at start the TRL-tokenised ``input_ids``/``labels`` are compared with
  ``dtrain.data.ChatRenderer``'s for every example trained (``mask_check`` in the output);
- examples longer than ``--max-seq-len`` are dropped before TRL sees them (dtrain's ``data.truncation=drop``),
  so TRL's own truncation never cuts one;
- the data order (``--order dtrain``, the default): the examples are laid out in the order of dtrain's
  ``StepSampler`` for ``--seed`` and read sequentially; Accelerate's sharding (micro-batch ``j`` of the stream goes
  to rank ``j % world``) then gives every rank the same micro-batches in every step as dtrain;
- the learning-rate schedule (``dtrain.optim.build_scheduler``: HF's warmup starts at lr 0, dtrain's does not);
- on CPU: threads per rank (cores // ranks, as ``dtrain.dist`` sets them) and gloo without DeepSpeed's shm
  all-reduce op.

What stays TRL's own: its tokenisation (``datasets.map``), collator (right padding to the longest example of the
micro-batch, like dtrain's), loss (its tiled "fused LM head" log-probabilities, normalised by the global
trained-token count like dtrain's), per-step metric gathers (entropy, token accuracy, token counts) and
HF Trainer's loop, logging and DeepSpeed integration.

Writes ``<out>/trl_metrics.json`` on rank 0: per step the wall time from the end of the previous step (data,
forward, backward, optimizer, TRL's per-step metric gathers and logging: what an epoch costs), the time from
``on_step_begin`` to ``on_step_end`` (no data loading, no logging), the global trained-token count (labels after the
shift, summed over micro-batches and ranks: the number TRL normalises the loss by), loss, grad norm, lr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script by the deepspeed launcher: make ``dtrain`` importable
    sys.path.insert(0, str(REPO_ROOT))

IGNORE_INDEX = -100

# The bundled ChatML template with TRL's generation markers around what dtrain trains: each assistant turn's
# content and the <|im_end|> that closes it (not the newline after it). Renders the same text as the original.
CHATML_TRAINING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|im_end|>{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dtrain.config.schema import TrainConfig

    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds-config", required=True, help="the ds_config.json of a dtrain run directory")
    p.add_argument("--model", required=True, help="folder with safetensors weights and the tokenizer")
    p.add_argument("--data", required=True, help="JSONL of {'messages': [...]} records")
    p.add_argument("--max-seq-len", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True, help="examples per rank per forward")
    p.add_argument("--grad-accum", type=int, required=True)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--out", required=True, help="output folder (trl_metrics.json)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="dtrain's train.seed: the data order")
    p.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    p.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio)
    p.add_argument("--schedule", default=defaults.schedule.value, choices=["cosine", "linear", "constant"])
    p.add_argument(
        "--order",
        default="dtrain",
        choices=["dtrain", "random"],
        help="dtrain: dtrain's StepSampler order read sequentially (same batches); random: HF's shuffling sampler",
    )
    p.add_argument(
        "--training-template",
        default=None,
        help="a chat template with {%% generation %%} markers (Jinja string or .jinja file); default: the "
        "marked ChatML copy above, used only if it renders like the tokenizer's own template",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    return p.parse_args(argv)


def skip_shm_allreduce() -> None:
    """Reduce through plain gloo, like dtrain on CPU (``dtrain.dist``): no JIT build of DeepSpeed's shm op."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def load_conversations(path: str) -> list[list[dict]]:
    with open(path) as f:
        return [[{"role": m["role"], "content": m["content"]} for m in json.loads(line)["messages"]] for line in f if line.strip()]


def training_template(tokenizer, conversations: list[list[dict]], override: str | None) -> str:
    """The template TRL tokenises with: renders every conversation to the same text as the tokenizer's own."""
    if override:
        path = Path(override)
        template = path.read_text() if path.suffix == ".jinja" and path.is_file() else override
    else:
        template = CHATML_TRAINING_TEMPLATE
    for messages in conversations:
        if tokenizer.apply_chat_template(messages, tokenize=False) != tokenizer.apply_chat_template(
            messages, tokenize=False, chat_template=template
        ):
            sys.exit(
                "bench/trl_sft.py: the marked training template renders differently from the tokenizer's chat template; "
                "pass --training-template with {% generation %} markers around each assistant turn of *that* template"
            )
    return template


def dtrain_order(num_examples: int, micro: int, accum: int, world: int, seed: int, steps: int) -> list[int]:
    """Example indices in the order dtrain's sampler trains them, ``steps`` global batches long."""
    from dtrain.config.batch import BatchPlan
    from dtrain.data import StepSampler

    sampler = StepSampler(num_examples, BatchPlan(micro, accum, world), rank=0, seed=seed)
    used = sampler.steps_per_epoch * sampler.batch.global_batch_size
    if used == 0:
        sys.exit(f"bench/trl_sft.py: {num_examples} examples do not fill one global batch of {sampler.batch.global_batch_size}")
    order, epoch = [], 0
    while len(order) < steps * sampler.batch.global_batch_size:
        order += sampler.epoch_order(epoch)[:used]  # dtrain leaves each epoch's tail out
        epoch += 1
    return order[: steps * sampler.batch.global_batch_size]


def trl_ds_config(path: str, micro: int, accum: int, world: int, lr: float) -> tuple[dict, dict]:
    """dtrain's JSON with the fields HF's Trainer cross-checks set from the command line, and the matching HF args."""
    ds = json.loads(Path(path).read_text())
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * world
    hf = {"max_grad_norm": ds.get("gradient_clipping", 0.0)}
    params = ds.get("optimizer", {}).get("params")
    if params is not None:
        params["lr"] = lr
        hf.update(
            adam_beta1=params["betas"][0], adam_beta2=params["betas"][1], adam_epsilon=params["eps"], weight_decay=params["weight_decay"]
        )
    if ds.get("fp16", {}).get("enabled"):
        sys.exit("bench/trl_sft.py: fp16 runs need CUDA; this benchmark compares bf16 or fp32")
    hf["bf16"] = bool(ds.get("bf16", {}).get("enabled"))
    return ds, hf


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_world = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world)
    if not torch.cuda.is_available():
        skip_shm_allreduce()
        if "OMP_NUM_THREADS" not in os.environ:
            # The same split of the cores as dtrain's ranks get. Exported too: Accelerate would otherwise set
            # physical cores / LOCAL_WORLD_SIZE threads, and the deepspeed launcher sets no LOCAL_WORLD_SIZE, so
            # each rank would take every core (2 ranks x 2 threads on 2 cores).
            threads = max(1, (os.cpu_count() or 1) // max(1, local_world))
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # The process group first, through DeepSpeed as dtrain does it: on CPU Accelerate would otherwise start a plain
    # torch one and leave deepspeed.comm uninitialised, and ZeRO-3's zero.Init (inside from_pretrained) would then
    # see a world of one and reject the batch sizes.
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from dtrain.config.schema import Schedule, TrainConfig, TrainOn
    from dtrain.data import ChatRenderer
    from dtrain.optim import build_scheduler

    out = Path(args.out)
    ds, hf_from_ds = trl_ds_config(args.ds_config, args.micro_batch, args.grad_accum, world, args.lr)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ds_config_trl.json").write_text(json.dumps(ds, indent=2, sort_keys=True) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    conversations = load_conversations(args.data)
    renderer = ChatRenderer(tokenizer, TrainOn.assistant)  # dtrain's masks, the reference for TRL's
    rendered = [renderer.render(m, f"{args.data}:{i + 1}") for i, m in enumerate(conversations)]
    keep = [i for i, e in enumerate(rendered) if len(e.input_ids) <= args.max_seq_len and e.num_trained > 0]
    dropped = len(conversations) - len(keep)
    if args.order == "dtrain":
        chosen = [keep[i] for i in dtrain_order(len(keep), args.micro_batch, args.grad_accum, world, args.seed, args.steps)]
    else:
        chosen = keep
    template = training_template(tokenizer, [conversations[i] for i in chosen], args.training_template)
    tokenizer.chat_template = template  # has generation markers, so TRL uses it as is
    dataset = Dataset.from_list([{"messages": conversations[i]} for i in chosen])

    # SFTConfig before the model: under ZeRO-3 it registers the DeepSpeed config that makes from_pretrained partition.
    config = SFTConfig(
        output_dir=str(out / "hf"),
        deepspeed=ds,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=args.lr,
        **hf_from_ds,
        seed=args.seed,
        data_seed=args.seed,
        train_sampling_strategy="sequential" if args.order == "dtrain" else "random",
        max_length=args.max_seq_len,
        packing=False,
        padding_free=False,
        assistant_only_loss=True,
        completion_only_loss=False,
        gradient_checkpointing=False,  # SFTConfig turns it on by default; dtrain's runs have it off
        logging_steps=1,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )
    dtype = torch.bfloat16 if hf_from_ds["bf16"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa", use_safetensors=True)
    model.config.use_cache = False

    schedule = TrainConfig(lr=args.lr, warmup_ratio=args.warmup_ratio, min_lr_ratio=args.min_lr_ratio, schedule=Schedule(args.schedule))

    class CountingSFTTrainer(SFTTrainer):
        """Counts this rank's trained and input tokens per micro-batch; dtrain's LR schedule."""

        trained_tokens = 0
        input_tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            # Kept as tensors until the step ends: no extra host sync per micro-batch on a GPU.
            self.trained_tokens = self.trained_tokens + (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
            mask = inputs.get("attention_mask")
            self.input_tokens = self.input_tokens + (mask.sum() if mask is not None else inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = build_scheduler(optimizer if optimizer is not None else self.optimizer, schedule, num_training_steps)
            return self.lr_scheduler

    class StepClock(TrainerCallback):
        """Per optimizer step: wall time since the previous step ended, compute time, this rank's token counts, logs."""

        def __init__(self):
            self.rows: list[dict] = []
            self.last = self.begin = None

        def on_train_begin(self, args_, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_begin(self, args_, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            now = time.perf_counter()
            self.rows.append(
                {
                    "step": state.global_step,
                    "step_time_s": now - self.last,
                    "compute_time_s": now - self.begin,
                    "local_trained": int(trainer.trained_tokens),
                    "local_input": int(trainer.input_tokens),
                }
            )
            trainer.trained_tokens = trainer.input_tokens = 0
            self.last = now

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "loss" in logs and self.rows and self.rows[-1]["step"] == state.global_step:
                self.rows[-1].update(loss=logs["loss"], grad_norm=logs.get("grad_norm"), lr=logs.get("learning_rate"))

    trainer = CountingSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    clock = StepClock()
    trainer.add_callback(clock)
    mask_check = check_masks(trainer.train_dataset, [rendered[i] for i in chosen]) if rank == 0 else None

    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0

    # Global token counts per step: every rank's own micro-batches, summed (a collective: all ranks call it).
    counts = torch.tensor(
        [[r["local_trained"], r["local_input"]] for r in clock.rows], dtype=torch.float64, device=trainer.accelerator.device
    )  # NCCL reduces only GPU tensors
    if dist.is_initialized() and world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    engine = trainer.model_wrapped
    if not isinstance(engine, deepspeed.DeepSpeedEngine):  # HF fell back to DDP or one process: not a comparison
        sys.exit(f"bench/trl_sft.py: HF's Trainer trained through {type(engine).__name__}, not a DeepSpeed engine")
    if rank == 0:
        import transformers
        import trl

        steps = [{k: v for k, v in r.items() if not k.startswith("local_")} for r in clock.rows]
        for r, (trained, inputs) in zip(steps, counts.cpu().tolist()):
            r.update(trained_tokens=int(trained), input_tokens=int(inputs))
        metrics = {
            "framework": "trl",
            "versions": {
                "trl": trl.__version__,
                "transformers": transformers.__version__,
                "deepspeed": deepspeed.__version__,
                "torch": torch.__version__,
            },
            "steps": len(steps),
            "per_step": steps,
            "total_train_time_s": result.metrics.get("train_runtime"),
            "train_call_wall_s": wall,
            "trained_tokens_total": sum(r["trained_tokens"] for r in steps),
            "world_size": world,
            "micro_batch": args.micro_batch,
            "grad_accum": args.grad_accum,
            "max_seq_len": args.max_seq_len,
            "precision": "bf16" if hf_from_ds["bf16"] else "fp32",
            "zero_stage": engine.zero_optimization_stage(),
            "engine": {
                "class": type(engine).__name__,
                "bf16": engine.bfloat16_enabled(),
                "optimizer": type(engine.optimizer).__name__,
                "basic_optimizer": type(getattr(engine, "basic_optimizer", None)).__name__,
                "distributed_type": str(trainer.accelerator.distributed_type),
            },
            "order": args.order,
            "threads_per_rank": torch.get_num_threads(),
            "examples": len(keep),
            "dropped_longer_than_max_seq_len": dropped,
            "mask_check": mask_check,
        }
        (out / "trl_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        print(
            f"bench/trl_sft.py: {len(steps)} steps, {metrics['trained_tokens_total']} trained tokens, "
            f"{wall:.1f} s in train(); masks equal to dtrain's on {mask_check['labels_equal']}/{mask_check['examples']} examples; "
            f"wrote {out / 'trl_metrics.json'}"
        )


def check_masks(train_dataset, reference) -> dict:
    """TRL's tokenised ``input_ids``/``labels`` against dtrain's render of the same examples, in training order."""
    ids_equal = labels_equal = 0
    first_difference = None
    for i, (row, ref) in enumerate(zip(train_dataset, reference)):
        same_ids = list(row["input_ids"]) == ref.input_ids
        same_labels = list(row["labels"]) == ref.labels
        ids_equal += same_ids
        labels_equal += same_labels
        if first_difference is None and not (same_ids and same_labels):
            first_difference = {
                "index": i,
                "trl_input_ids": list(row["input_ids"]),
                "trl_labels": list(row["labels"]),
                "dtrain_input_ids": ref.input_ids,
                "dtrain_labels": ref.labels,
            }
    return {"examples": len(reference), "input_ids_equal": ids_equal, "labels_equal": labels_equal, "first_difference": first_difference}


if __name__ == "__main__":
    main()

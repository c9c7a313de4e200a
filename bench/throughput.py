"""Throughput and MFU of one experiment: trained and input tokens/s, TFLOP/s per GPU, MFU, where the step goes.

    .venv/bin/python bench/throughput.py +exp=tiny_cpu --num-gpus 2 --steps 30 --json throughput.json
    python bench/throughput.py +exp=7b_zero3 model.init=random data.packing=true --num-gpus 8 --steps 50   # a GPU node
    # one H100: full fine-tuning of a 1B / 3B Llama shape, 4096-token packed rows, bf16
    python bench/throughput.py +exp=tiny_cpu --shape llama3_1b --num-gpus 1 --steps 30 data.max_seq_len=4096 \
        data.packing=true train.micro_batch_size=1 precision=bf16 zero=zero2 model.gradient_checkpointing=false
    # LoRA on an 8B shape: adapters need a base on disk, so --save-weights writes random bf16 weights first
    python bench/throughput.py +exp=tiny_cpu --shape llama3_8b --save-weights peft=lora --num-gpus 1 --steps 20 \
        data.max_seq_len=4096 data.packing=true train.micro_batch_size=1 precision=bf16 zero=zero2
    .venv/bin/python bench/throughput.py --smoke --json /tmp/smoke.json

Weights are random unless the overrides say otherwise (``model.init=random``: speed does not depend on them).
Arguments that are not options are Hydra overrides for ``launch/train.py``. MFU needs a GPU (its peak is looked
up by name, or ``train.peak_tflops=...``); on CPU it is "-".
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import SHAPES, launch, machine, table, with_model, write_json

SMOKE = ["+exp=tiny_cpu", "train.micro_batch_size=4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +exp=tiny_cpu data.packing=true")
    parser.add_argument("--num-gpus", type=int, default=2, help="ranks (GPUs, or CPU processes without a GPU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the means")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--shape", default=None, help="random-weight model of a published shape: " + ", ".join(SHAPES))
    parser.add_argument(
        "--save-weights", action="store_true", help="with --shape: write random weights to disk and load them (needed by peft=lora)"
    )
    parser.add_argument("--smoke", action="store_true", help="3 steps of the tiny model on 1 rank (overrides given are added)")
    args = parser.parse_intermixed_args()  # Hydra overrides may come before, between or after the options
    overrides = args.overrides or ["+exp=tiny_cpu"]
    if args.smoke:
        overrides, args.steps, args.warmup, args.num_gpus = SMOKE + args.overrides, 3, 1, 1
    run_dir = Path(args.out or tempfile.mkdtemp(prefix="dtrain-bench-throughput-"))
    overrides = with_model(overrides, args.shape, run_dir.with_name(run_dir.name + "-model"), args.save_weights)
    run = launch("throughput", [*overrides, f"train.max_steps={args.steps}"], run_dir, args.num_gpus, args.warmup)
    row = run.as_dict()
    row.update({f"{phase}_share": seconds / run.step_time_s for phase, seconds in run.phases_s.items()} if run.step_time_s else {})
    print(f"\n{machine()}, {args.num_gpus} rank(s), {run.steps} steps (first {args.warmup} left out): {' '.join(overrides)}")
    print(
        table(
            [row],
            [
                ("trained_tokens_per_s", "trained tok/s", ",.0f"),
                ("input_tokens_per_s", "input tok/s", ",.0f"),
                ("tflops_per_gpu", "TFLOP/s/GPU", ".3g"),
                ("mfu", "MFU", ".1%"),
                ("step_time_s", "step s", ".3f"),
                ("data_share", "data", ".0%"),
                ("forward_share", "fwd", ".0%"),
                ("backward_share", "bwd", ".0%"),
                ("optimizer_share", "optim", ".0%"),
                ("padding_efficiency", "padding eff", ".1%"),
            ],
        )
    )
    write_json(args.json, {"bench": "throughput", "machine": machine(), "num_gpus": args.num_gpus, "overrides": overrides, "run": row})
    if run.exit_code != 0:
        raise SystemExit(f"the run failed (exit {run.exit_code}): {run.error}")


if __name__ == "__main__":
    main()

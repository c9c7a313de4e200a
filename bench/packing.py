"""Packed vs padded on the same data, side by side in one run: trained tokens/s, padding efficiency, time per epoch.

    .venv/bin/python bench/packing.py +exp=tiny_cpu --num-gpus 2 --steps 30 --json packing.json
    python bench/packing.py +exp=7b_zero3 model.init=random data.path=/data/chat.jsonl --num-gpus 8   # a GPU node
    .venv/bin/python bench/packing.py --smoke --json /tmp/smoke.json

Jobs on identical data and settings: padded batches in shuffled order (``data.group_by_length=none``), the same
steps with each step's examples sorted by length before the split into micro-batches (``within_step``, the
default: same gradient per step), steps grouped by length (``across_steps``: different steps), and padding-free
packed rows (``data.packing=true``, position ids restart per example). Sorting within a step only saves time
when a rank runs several micro-batches per step (``train.grad_accum_steps`` > 1). Packed rows hold several
examples, so a step trains more tokens: the fair comparison is trained tokens/s and the time of one epoch (mean
step time x steps per epoch).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import SHAPES, finish, launch, machine, ratio, table, with_model

VARIANTS = {
    "padded": ["data.packing=false", "data.group_by_length=none"],
    "sorted": ["data.packing=false", "data.group_by_length=within_step"],
    "grouped": ["data.packing=false", "data.group_by_length=across_steps"],
    "packed": ["data.packing=true"],
}
SMOKE = ["+exp=tiny_cpu", "train.micro_batch_size=4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +exp=tiny_cpu")
    parser.add_argument("--num-gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--packed-micro-batch",
        type=int,
        default=None,
        help="rows per micro-batch when packed (default: the padded micro-batch / 4, at least 1)",
    )
    parser.add_argument("--variants", default="padded,sorted,grouped,packed")
    parser.add_argument("--shape", default=None, help="random-weight model of a published shape: " + ", ".join(SHAPES))
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="2 steps of the tiny model on 1 rank, packed only (overrides given are added)")
    args = parser.parse_intermixed_args()  # Hydra overrides may come before, between or after the options
    overrides = args.overrides or ["+exp=tiny_cpu"]
    variants = args.variants.split(",")
    if args.smoke:
        overrides, args.steps, args.warmup, args.num_gpus, variants = SMOKE + args.overrides, 2, 1, 1, ["packed"]
    from dtrain.config import compose_job, register_configs

    register_configs()
    micro = compose_job(overrides).train.micro_batch_size
    packed_micro = args.packed_micro_batch or max(1, micro // 4)
    root = Path(tempfile.mkdtemp(prefix="dtrain-bench-packing-"))
    overrides = with_model(overrides, args.shape, root / "model")
    rows = []
    for name in variants:
        extra = VARIANTS[name] + ([f"train.micro_batch_size={packed_micro}"] if name == "packed" else [])
        run = launch(name, [*overrides, *extra, f"train.max_steps={args.steps}"], root / name, args.num_gpus, args.warmup)
        rows.append(run.as_dict())
    base = rows[0]
    for row in rows:
        row["tokens_per_s_vs_first"] = ratio(row["trained_tokens_per_s"], base["trained_tokens_per_s"])
        row["epoch_time_vs_first"] = ratio(row["epoch_time_s"], base["epoch_time_s"])
    print(f"\n{machine()}, {args.num_gpus} rank(s), {args.steps} steps each (first {args.warmup} left out): {' '.join(overrides)}")
    print(
        table(
            rows,
            [
                ("name", "batching", ""),
                ("trained_tokens_per_s", "trained tok/s", ",.0f"),
                ("padding_efficiency", "padding eff", ".1%"),
                ("step_time_s", "step s", ".3f"),
                ("steps_per_epoch", "steps/epoch", "d"),
                ("epoch_time_s", "epoch s", ",.1f"),
                ("tokens_per_s_vs_first", f"tok/s vs {base['name']}", ".2f"),
                ("epoch_time_vs_first", f"epoch vs {base['name']}", ".2f"),
            ],
        )
    )
    finish("packing", args.json, args.num_gpus, overrides, rows)


if __name__ == "__main__":
    main()

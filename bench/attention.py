"""Attention implementations side by side: eager, sdpa, and flash-attn when it is installed (GPU only).

    .venv/bin/python bench/attention.py +exp=tiny_cpu --num-gpus 2 --steps 20 --json attention.json
    python bench/attention.py +exp=7b_zero3 model.init=random data.packing=true --num-gpus 8   # a GPU node
    .venv/bin/python bench/attention.py --smoke --json /tmp/smoke.json

The same job with ``model.attn_implementation`` set to each implementation; trained tokens/s, step time and
MFU, with each implementation's speed relative to the first (eager). Packed rows need an implementation that honours
per-example position ids (sdpa and flash-attn in transformers >= 4.44; the run log says which one ran).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

from common import SHAPES, finish, launch, machine, ratio, table, with_model

SMOKE = ["+exp=tiny_cpu", "train.micro_batch_size=4"]


def available_implementations() -> list[str]:
    import torch

    names = ["eager", "sdpa"]
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attention_2")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +exp=tiny_cpu")
    parser.add_argument("--num-gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--implementations", default=None, help="comma-separated (default: every one available)")
    parser.add_argument("--shape", default=None, help="random-weight model of a published shape: " + ", ".join(SHAPES))
    parser.add_argument("--smoke", action="store_true", help="2 steps of the tiny model on 1 rank, sdpa only (overrides given are added)")
    args = parser.parse_intermixed_args()  # Hydra overrides may come before, between or after the options
    overrides = args.overrides or ["+exp=tiny_cpu"]
    if args.smoke:
        overrides, args.steps, args.warmup, args.num_gpus, args.implementations = SMOKE + args.overrides, 2, 1, 1, "sdpa"
    root = Path(tempfile.mkdtemp(prefix="dtrain-bench-attention-"))
    overrides = with_model(overrides, args.shape, root / "model")
    rows = []
    for name in args.implementations.split(",") if args.implementations else available_implementations():
        run = launch(
            name,
            [*overrides, f"model.attn_implementation={name}", f"train.max_steps={args.steps}"],
            root / name,
            args.num_gpus,
            args.warmup,
        )
        rows.append(run.as_dict())
    for row in rows:
        row["speed_vs_first"] = ratio(row["trained_tokens_per_s"], rows[0]["trained_tokens_per_s"])
    print(f"\n{machine()}, {args.num_gpus} rank(s), {args.steps} steps each (first {args.warmup} left out): {' '.join(overrides)}")
    print(
        table(
            rows,
            [
                ("name", "attention", ""),
                ("trained_tokens_per_s", "trained tok/s", ",.0f"),
                ("step_time_s", "step s", ".3f"),
                ("mfu", "MFU", ".1%"),
                ("final_loss", "loss", ".4f"),
                ("speed_vs_first", f"vs {rows[0]['name']}", ".2f"),
            ],
        )
    )
    finish("attention", args.json, args.num_gpus, overrides, rows)


if __name__ == "__main__":
    main()

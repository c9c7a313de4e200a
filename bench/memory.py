"""Peak memory against the planner for a set of configurations: model states exactly, the peak as measured.

    .venv/bin/python bench/memory.py +exp=tiny_cpu --num-gpus 2 --json memory.json
    python bench/memory.py +exp=7b_zero3 model.init=random --num-gpus 8 --configs zero2:none,zero3:none,zero3:lora
    python bench/memory.py +exp=tiny_cpu data.max_seq_len=4096 --shape llama3_1b --num-gpus 1   # one H100
    .venv/bin/python bench/memory.py --smoke --json /tmp/smoke.json

For each ``zero:peft`` configuration a short job runs and writes ``memory.json``: the plan (per GPU: params,
grads, optimizer, activations, other) and what every rank measured (engine tensors, gradients inside the first
step, peak CUDA memory on GPU or peak RSS on CPU). On CPU the peak RSS also holds the Python process itself
(libraries, tokenizer, data), so there only the model states compare; on GPU the peak is allocated CUDA memory.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import SHAPES, finish, launch, machine, make_tiny_pretrained, ratio, table, with_model

DEFAULT_CONFIGS = "zero1:none,zero2:none,zero3:none,zero2:lora,zero3:lora"
STATES = ("params", "grads", "optimizer")


def compare(memory: dict) -> dict:
    """Planned vs measured (rank 0) model states, and the planned total vs the peak over ranks, in MiB."""
    plan, rank0 = memory["plan"], memory["measured_per_rank"][0]
    planned_states = sum(plan["per_gpu_bytes"][k] + plan["per_rank_cpu_bytes"][k] for k in STATES)
    measured_states = sum(rank0.get(k, 0) + rank0.get(f"cpu_{k}", 0) for k in STATES)
    peak_key = "peak_cuda_allocated" if "peak_cuda_allocated" in rank0 else "peak_rss"
    peak = max(m[peak_key] for m in memory["measured_per_rank"])
    mib = 2**20
    return {
        "planned_states_mib": planned_states / mib,
        "measured_states_mib": measured_states / mib,
        "states_ratio": ratio(measured_states, planned_states),
        "planned_total_mib": plan["per_gpu_bytes"]["total"] / mib,
        "peak_mib": peak / mib,
        "peak_kind": peak_key,
        "peak_vs_plan": ratio(peak, plan["per_gpu_bytes"]["total"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +exp=tiny_cpu")
    parser.add_argument("--num-gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated zero:peft pairs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--shape", default=None, help="random-weight model of a published shape: " + ", ".join(SHAPES))
    parser.add_argument("--smoke", action="store_true", help="one zero2 job of the tiny model on 1 rank (overrides given are added)")
    args = parser.parse_intermixed_args()  # Hydra overrides may come before, between or after the options
    overrides = args.overrides or ["+exp=tiny_cpu", "train.micro_batch_size=8"]
    configs = [c.split(":") for c in args.configs.split(",")]
    if args.smoke:
        smoke = ["+exp=tiny_cpu", "train.micro_batch_size=4", *args.overrides]  # the smoke settings, then any overrides given
        overrides, args.steps, args.num_gpus, configs = smoke, 2, 1, [["zero2", "none"]]
    root = Path(tempfile.mkdtemp(prefix="dtrain-bench-memory-"))
    adapters = any(peft != "none" for _, peft in configs)
    if args.shape:  # adapters need a base on disk: then the shape's random weights are saved first
        overrides = with_model(overrides, args.shape, root / "model", save_weights=adapters)
    elif adapters and not any(o.startswith("model.path=") for o in overrides):
        # Adapters need saved base weights to be reloadable; the tiny model is saved like a hub model.
        overrides = [*overrides, f"model.path={make_tiny_pretrained(root / 'tiny')}", "model.init=pretrained"]
    rows = []
    for zero, peft in configs:
        run = launch(
            f"{zero} {peft}",
            [*overrides, f"zero={zero}", f"peft={peft}", f"train.max_steps={args.steps}"],
            root / f"{zero}-{peft}",
            args.num_gpus,
        )
        row = {"config": f"{zero} {peft}", "exit_code": run.exit_code, "error": run.error}
        if run.memory:
            row.update(compare(run.memory))
        rows.append(row)
    print(f"\n{machine()}, {args.num_gpus} rank(s): {' '.join(overrides)}")
    print(
        table(
            rows,
            [
                ("config", "config", ""),
                ("planned_states_mib", "states plan MiB", ",.2f"),
                ("measured_states_mib", "states measured", ",.2f"),
                ("states_ratio", "measured/plan", ".4f"),
                ("planned_total_mib", "total plan MiB", ",.1f"),
                ("peak_mib", "peak MiB", ",.1f"),
                ("peak_kind", "peak of", ""),
                ("peak_vs_plan", "peak/plan", ".2f"),
            ],
        )
    )
    finish("memory", args.json, args.num_gpus, overrides, rows, name_key="config")


if __name__ == "__main__":
    main()

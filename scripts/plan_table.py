"""Print the memory planner's table for docs/MEMORY.md: 7B/8B/13B/70B, full and LoRA, on 8 x 80 GB.

.venv/bin/python scripts/plan_table.py
"""

from dtrain.architectures import model_shape
from dtrain.config import asset_path
from dtrain.config.schema import Precision
from dtrain.memory.plan import GiB, PlanSetup, plan_memory

MODELS = ["llama2_7b", "llama3_8b", "llama2_13b", "llama2_70b"]
SETUPS = [
    PlanSetup(3, False, False, "none", True),
    PlanSetup(3, True, False, "none", True),
    PlanSetup(3, True, True, "none", True),
    PlanSetup(2, False, False, "lora", True),
    PlanSetup(3, False, False, "lora", True),
    PlanSetup(2, False, False, "qlora", True),
]


def main() -> None:
    from transformers import AutoConfig

    precision = Precision.bf16
    print("| model | setup | params | grads | optimizer | activations | other | total GiB/GPU | CPU GiB/node | fits 80 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        config = AutoConfig.from_pretrained(asset_path(f"configs/{name}"))
        shape = model_shape(config)
        for setup in SETUPS:
            plan = plan_memory(
                shape,
                setup,
                precision=precision,
                micro_batch=4,
                seq_len=2048,
                world_size=8,
                gpus_per_node=8,
                lora_r=16,
                capacity_bytes=80 * 10**9,
            )
            g = {k: f"{v / GiB:.1f}" for k, v in plan.per_gpu_bytes.items()}
            print(
                f"| {name} ({shape.num_parameters / 1e9:.1f}B) | {setup.label} | {g['params']} | {g['grads']} | "
                f"{g['optimizer']} | {g['activations']} | {g['other']} | **{g['total']}** | "
                f"{plan.per_node_cpu_bytes / GiB:.0f} | {'yes' if plan.fits else 'no'} |"
            )


if __name__ == "__main__":
    main()

"""Why ``precision=auto`` picks what it picks on a CPU: matmul GFLOP/s in fp32 and bf16, side by side, and the choice.

    .venv/bin/python bench/cpu_precision.py --json cpu_precision.json
    .venv/bin/python bench/cpu_precision.py --smoke --json /tmp/smoke.json

On a CPU with native bf16 (AVX512-BF16 or AMX) a bf16 matmul is about as fast as fp32 or faster; on an AVX2-only
CPU it was measured 38x slower (1.3 vs 49 GFLOP/s, torch 2.13), which made the demo take 25 minutes in bf16.
One process, the threads of one demo rank (half the cores), square matmuls of the tiny model's sizes and larger.
"""

from __future__ import annotations

import argparse
import os
import time

from common import machine, table, write_json

SIZES = (128, 384, 1024)


def gflops(size: int, dtype, repeats: int) -> float:
    import torch

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up: kernel selection, packing buffers
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    import torch

    from dtrain.resolve import choose_precision, machine_facts

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--seconds", type=float, default=1.0, help="about this long per size and dtype")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few repeats (the test suite runs this)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    sizes = (64,) if args.smoke else SIZES
    rows = []
    for size in sizes:
        probe = max(1, int(args.seconds * 1e9 / (2 * size**3) / 4)) if not args.smoke else 3
        fp32 = gflops(size, torch.float32, probe)
        bf16 = gflops(size, torch.bfloat16, probe)
        rows.append({"size": size, "fp32_gflops": fp32, "bf16_gflops": bf16, "bf16_vs_fp32": bf16 / fp32})
    facts = machine_facts()
    precision, reason = choose_precision(facts)
    print(
        table(
            rows,
            [
                ("size", "n x n matmul", ""),
                ("fp32_gflops", "fp32 GFLOP/s", ".1f"),
                ("bf16_gflops", "bf16 GFLOP/s", ".1f"),
                ("bf16_vs_fp32", "bf16 / fp32", ".2f"),
            ],
        )
    )
    print(
        f"precision=auto on this machine: {precision.value} ({reason}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    write_json(
        args.json,
        {
            "bench": "cpu_precision",
            "machine": machine(),
            "threads": torch.get_num_threads(),
            "cpu_bf16_flag": facts.cpu_bf16,
            "auto_precision": precision.value,
            "reason": reason,
            "runs": rows,
        },
    )


if __name__ == "__main__":
    main()

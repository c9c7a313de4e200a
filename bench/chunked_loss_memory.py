"""Peak memory and time of the loss alone (forward + backward): plain logits vs chunked cross-entropy.

    .venv/bin/python bench/chunked_loss_memory.py --vocab 128256 --hidden 4096 --tokens 4096 --chunk-size 1024 \\
        --dtype bf16 --json chunked_loss.json
    .venv/bin/python bench/chunked_loss_memory.py --smoke --json /tmp/smoke.json   # tiny sizes, seconds

"plain" is what the trainer does without chunking: ``logits = hidden @ weight.T`` (the lm_head) then
``token_loss_sum``. "chunked" is ``dtrain.chunked_loss.chunked_token_loss_sum`` on the torch path; "liger"
is added on CUDA when liger-kernel is installed. Each variant runs in a fresh subprocess on identical seeded
inputs, so one variant's allocations cannot hide inside another's high-water mark. The memory reported is the
peak above what was live once the inputs existed: on CUDA ``torch.cuda.max_memory_allocated`` (tensor bytes,
allocator cache excluded); on CPU the peak resident set size (``getrusage`` ``ru_maxrss``) minus the resident size
before the loss, with glibc's mmap threshold pinned so that freed tensors really leave the process. Both counts
include the gradients that both variants return (``hidden.grad``, ``weight.grad``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SMOKE = dict(vocab=512, hidden=64, tokens=256, chunk_size=64, dtype="fp32")


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """One forward + backward of the loss in this process; the memory measured around it."""
    import torch

    from dtrain.chunked_loss import chunked_token_loss_sum, liger_available
    from dtrain.loss import shift_labels, token_loss_sum

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    dtype = getattr(torch, DTYPES[args.dtype])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, args.tokens, args.hidden, generator=g).to(device, dtype).requires_grad_()
    weight = (0.02 * torch.randn(args.vocab, args.hidden, generator=g)).to(device, dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.tokens), generator=g)
    labels[torch.rand(1, args.tokens, generator=g) < args.ignored_fraction] = -100
    targets = shift_labels(labels).to(device)

    def loss_fn(h=hidden, w=weight, y=targets):
        if variant == "plain":
            return token_loss_sum(h @ w.T, y)
        return chunked_token_loss_sum(h, w, y, args.chunk_size, use_liger=variant == "liger")

    # Lazy initialisation (kernels, autograd, allocator) on tiny slices, so neither the time nor the memory of
    # the measured run pays for it and the high-water mark stays below the measured run's.
    tiny_hidden, tiny_weight = hidden[:, :8].detach().requires_grad_(), weight[:64].detach().requires_grad_()
    loss_fn(tiny_hidden, tiny_weight, targets[:, :8] % 64).backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, peak = [], None
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        sync()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _current_rss_bytes()
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        sync()
        times.append(time.perf_counter() - t0)
        # The first repeat gives the memory: on CPU the high-water mark cannot be reset between repeats.
        if peak is None:
            peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()) - base
    return {
        "device": str(device),
        "repeats": repeats,
        "liger_available": liger_available(),
        "peak_bytes": max(int(peak), 0),
        "time_s": min(times),
        "loss": float(loss),
        "grad_hidden_norm": float(hidden.grad.double().norm()),
        "grad_weight_norm": float(weight.grad.double().norm()),
    }


def _in_subprocess(variant: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--tokens",
        str(args.tokens),
        "--chunk-size",
        str(args.chunk_size),
        "--dtype",
        args.dtype,
        "--ignored-fraction",
        str(args.ignored_fraction),
    ]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--repeats", str(args.repeats)] if args.repeats else []
    # Large frees go straight back to the OS, so RSS follows the live tensors instead of malloc's free lists.
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": path}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default: 3 on CUDA, 1 on CPU)")
    p.add_argument(
        "--ignored-fraction",
        type=float,
        default=0.0,
        help="fraction of labels set to IGNORE_INDEX (prompt tokens); 0 compares the worst case",
    )
    p.add_argument("--smoke", action="store_true", help=f"tiny sizes for tests: {SMOKE}")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.vocab, args.hidden, args.tokens = SMOKE["vocab"], SMOKE["hidden"], SMOKE["tokens"]
        args.chunk_size, args.dtype = SMOKE["chunk_size"], SMOKE["dtype"]
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return {}

    # This process never imports torch: the children resolve the device, and the first one fixes it for the rest.
    results = {"plain": _in_subprocess("plain", args)}
    args.device, args.repeats = results["plain"]["device"], results["plain"]["repeats"]
    results["chunked"] = _in_subprocess("chunked", args)
    if args.device.startswith("cuda") and results["plain"]["liger_available"]:
        results["liger"] = _in_subprocess("liger", args)
    plain = results["plain"]
    measure = (
        "torch.cuda.max_memory_allocated above the inputs"
        if args.device.startswith("cuda")
        else "peak RSS (getrusage ru_maxrss) above the RSS once inputs exist, fresh process per variant"
    )
    report = {
        "config": {
            "vocab": args.vocab,
            "hidden": args.hidden,
            "tokens": args.tokens,
            "chunk_size": args.chunk_size,
            "dtype": args.dtype,
            "device": args.device,
            "repeats": args.repeats,
            "ignored_fraction": args.ignored_fraction,
            "smoke": args.smoke,
        },
        "memory_measure": measure,
        "variants": results,
        "float32_logits_bytes": args.tokens * args.vocab * 4,
        "loss_abs_diff": max(abs(r["loss"] - plain["loss"]) for r in results.values()),
        "loss_rel_diff": max(abs(r["loss"] - plain["loss"]) for r in results.values()) / max(abs(plain["loss"]), 1e-30),
        "peak_saved_bytes": plain["peak_bytes"] - results["chunked"]["peak_bytes"],
    }
    print(
        f"loss forward+backward: vocab {args.vocab}, hidden {args.hidden}, tokens {args.tokens}, "
        f"chunk {args.chunk_size}, {args.dtype} on {args.device}"
    )
    print(f"memory: {measure}; one float32 [tokens, vocab] logits tensor = {_gib(report['float32_logits_bytes'])}")
    print(f"{'variant':<8} {'peak':>12} {'time':>9} {'loss':>16} {'|grad h|':>12} {'|grad W|':>12}")
    for name, r in results.items():
        print(
            f"{name:<8} {_gib(r['peak_bytes']):>12} {r['time_s']:>8.3f}s {r['loss']:>16.6f} "
            f"{r['grad_hidden_norm']:>12.6g} {r['grad_weight_norm']:>12.6g}"
        )
    print(
        f"peak saved by chunking: {_gib(report['peak_saved_bytes'])} "
        f"({plain['peak_bytes'] / max(results['chunked']['peak_bytes'], 1):.1f}x less); "
        f"loss difference {report['loss_abs_diff']:.3g} (relative {report['loss_rel_diff']:.2g})"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

"""The longest sequence the tiny model trains within an activation budget, with and without each long-sequence piece.

    .venv/bin/python bench/long_sequence.py --budget-mib 64 --json long.json
    .venv/bin/python bench/long_sequence.py --smoke --json /tmp/long.json

One process, no launcher: for each configuration, one training forward of a single row under saved-tensor hooks
(``dtrain.memory.meters.measure_saved_bytes``: what autograd keeps for backward, wherever it lives) at doubling,
then bisected, lengths, and the longest that stays within the budget, beside the planner's estimate for it.
With recomputation only the layer inputs are saved in forward; the recomputed layer (where tiling also helps) lives
during backward and is not in these figures.
Pieces measured here: recomputation (``model.gradient_checkpointing``), the chunked loss head
(``train.loss_chunk_size``), tiled MLP (``model.tiled_mlp``). Activation offload moves the saved layer inputs to host
memory, which on a CPU is the same memory, and sequence parallelism needs several ranks: both are priced by the
planner (``launch/plan.py plan.max_seq_len=search``) and measured on a GPU (``bench/gpu_checks.sh``).
"""

from __future__ import annotations

import argparse

import torch

from dtrain.architectures import model_shape
from dtrain.chunked_loss import install_chunked_loss_head
from dtrain.config import asset_path
from dtrain.long_context import TileCount, install_tiled_mlp
from dtrain.loss import shift_labels
from dtrain.memory.meters import measure_saved_bytes
from dtrain.memory.plan import activation_bytes

from common import machine, table, write_json

CONFIGS = {  # name: (gradient checkpointing, chunked loss, tiled MLP), each adding to the one before
    "plain": (False, False, False),
    "+ chunked loss": (False, True, False),
    "+ tiled MLP": (False, True, True),
    "+ recomputation": (True, True, True),
}


def build(checkpointing: bool, chunked: bool, tiled: bool, tile_tokens: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(asset_path("tiny"))
    config._attn_implementation = "sdpa"
    config.max_position_embeddings = 1 << 20
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head = install_chunked_loss_head(model, 1024) if chunked else None
    count = TileCount(tile_tokens, reduce_max=lambda n: n)
    if tiled:
        install_tiled_mlp(model, count)
    return model, head, count


def saved_bytes(model, head, count, seq: int) -> int:
    ids = torch.randint(3, model.config.vocab_size, (1, seq))
    targets = shift_labels(ids)
    count.agree(seq)

    def forward():
        if head is not None:
            head.targets = targets
            return model(input_ids=ids, use_cache=False).logits
        logits = model(input_ids=ids, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")

    _, saved = measure_saved_bytes(forward, exclude=list(model.parameters()))
    return saved


def longest(model, head, count, budget: int, start: int = 256, limit: int = 1 << 20) -> int:
    low, high = 0, start
    while high <= limit and saved_bytes(model, head, count, high) <= budget:
        low, high = high, high * 2
    while high - low > 64:  # bisect to 64 tokens
        mid = (low + high) // 2
        low, high = (mid, high) if saved_bytes(model, head, count, mid) <= budget else (low, mid)
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-mib", type=float, default=64.0)
    parser.add_argument("--tile-tokens", type=int, default=128, help="model.tiled_mlp_tokens (the tiny model's hidden size)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="a 16 MiB budget")
    args = parser.parse_args()
    budget = int((16 if args.smoke else args.budget_mib) * 2**20)
    shape = None
    rows = []
    for name, (checkpointing, chunked, tiled) in CONFIGS.items():
        model, head, count = build(checkpointing, chunked, tiled, args.tile_tokens)
        shape = shape or model_shape(model.config)
        seq = longest(model, head, count, budget)
        planned = activation_bytes(
            shape, 1, seq, 4, checkpointing, include_recompute=False, loss_chunk_size=1024 if chunked else None, tiled_mlp=tiled
        )
        rows.append({"config": name, "longest_seq": seq, "measured_bytes": saved_bytes(model, head, count, seq), "planned_bytes": planned})
        print(f"[bench] {name}: {seq} tokens", flush=True)
    for r in rows:
        r["x_plain"] = r["longest_seq"] / rows[0]["longest_seq"]
        r["plan_vs_measured"] = r["planned_bytes"] / r["measured_bytes"]
    print(f"\nmachine: {machine()}; budget {budget / 2**20:.0f} MiB of saved activations, fp32, tiny model, one row")
    columns = [("config", "config", ""), ("longest_seq", "longest sequence", ""), ("x_plain", "x plain", ".1f")]
    print(table(rows, columns + [("plan_vs_measured", "plan / measured", ".2f")]))
    write_json(args.json, {"bench": "long_sequence", "machine": machine(), "budget_bytes": budget, "runs": rows})


if __name__ == "__main__":
    main()

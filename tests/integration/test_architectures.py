"""Each model family through the real launcher on 2 CPU ranks: full fine-tuning and LoRA under ZeRO-2 and ZeRO-3.

A run trains 3 steps of a tiny random checkpoint of the family (tests/architectures.py), then its export is
re-read and must reproduce the engine's logits, and the memory plan's model states must equal what the engine
holds. The suite runs the CI set below (the fused-projection, soft-capping and MoE families, MoE under ZeRO-3 where
experts that see no token could hang a rank); ``DTRAIN_ARCH_MATRIX=full`` runs all of
``FAMILIES x {none, lora} x {zero2, zero3}``.
"""

import json
import math
import os

import pytest

from dtrain.metrics import read_metrics

from tests.architectures import FAMILIES, MOE, save_tiny
from tests.conftest import launch_train

pytestmark = pytest.mark.integration

# The other families: in-process (tests/unit/test_architectures.py) and in the full matrix. MoE under ZeRO-3 runs
# with LoRA, which adapts the fused expert weights too: idle experts meet the forward gathers and the backward
# reduce-scatters of trained expert parameters (full fine-tuning of MoE under ZeRO-3 is in the full matrix; full
# fine-tuning under ZeRO-3 runs here with Gemma-2).
CI_SET = [
    ("gemma2", "none", "zero3"),
    ("phi3", "lora", "zero2"),
    ("qwen3_moe", "lora", "zero3"),
]
FULL = [(f, p, z) for f in FAMILIES for p in ("none", "lora") for z in ("zero2", "zero3")]
CASES = FULL if os.environ.get("DTRAIN_ARCH_MATRIX") == "full" else CI_SET


@pytest.mark.parametrize("family, peft, zero", CASES, ids=["-".join(c) for c in CASES])
def test_family_trains_exports_and_matches_the_plan(tmp_path, family, peft, zero):
    checkpoint = save_tiny(family, tmp_path / family)
    run_dir = tmp_path / "run"
    out = launch_train(
        [
            "+exp=tiny_cpu",
            f"model.path={checkpoint}",
            "model.init=pretrained",
            f"peft={peft}",
            f"zero={zero}",
            "precision=fp32",
            "train.max_steps=3",
            "train.micro_batch_size=4",
            "train.eval_every=0",
            "train.warmup_ratio=0",
            "data.packing=true",
            "generate.num_prompts=1",
            "generate.max_new_tokens=4",
            "generate.before_training=false",
            "export.verify=logits",
        ],
        run_dir,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    steps = read_metrics(run_dir).steps
    assert len(steps) == 3 and all(math.isfinite(r.loss) and r.tokens > 0 for r in steps)
    assert "reloaded logits match the engine's" in out.stdout
    if peft == "lora" and family in MOE:
        assert "and the fused expert weights ['experts.down_proj', 'experts.gate_up_proj']" in out.stdout
        assert "frozen without an adapter: the routers" in out.stdout
    if zero == "zero3" and family in MOE:
        assert "gathered whole (every rank joins each gather" in out.stdout
    if family == "gemma2":
        assert "Gemma2ForCausalLM has no sdpa attention in transformers, so eager" in out.stdout
    memory = json.loads((run_dir / "memory.json").read_text())
    plan, measured = memory["plan"], memory["measured_per_rank"][0]
    for kind in ("params", "grads", "optimizer"):
        planned = plan["per_gpu_bytes"][kind] + plan["per_rank_cpu_bytes"][kind]
        assert measured[kind] + measured[f"cpu_{kind}"] == pytest.approx(planned, rel=1e-3), kind

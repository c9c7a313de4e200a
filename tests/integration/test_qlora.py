"""QLoRA under ZeRO-2 and ZeRO-3, and 8-bit AdamW, on 2 CPU ranks through the deepspeed launcher.

Precision: ``precision=auto`` (the demo's choice: bf16 where the CPU computes it natively, fp32 elsewhere). Each check
reloads and compares in the precision the run resolved to (its ``config.yaml``), so the test means the same on any
CPU; ``DTRAIN_CPU_FLAGS`` takes either branch here (``make test-precision-branches``).
"""

import glob
import logging
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import launch_train, read_jsonl
from tests.integration.conftest import TWO_RANK_RUN

pytestmark = pytest.mark.integration
bnb = pytest.importorskip("bitsandbytes")

SHORT = [
    "+exp=tiny_cpu",
    "train.micro_batch_size=8",
    "train.warmup_ratio=0",
    "generate.num_prompts=2",
    "generate.max_new_tokens=4",
    "generate.before_training=false",
]


def optimizer_tensors(run_dir, step):
    """Every tensor of every rank's optimizer state in checkpoint ``step`` (bitsandbytes nests its own)."""
    out = []
    for f in sorted(glob.glob(str(run_dir / "checkpoints" / f"step_{step:08d}" / "*optim_states.pt"))):
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = osd.get("base_optimizer_state") or osd["optimizer_state_dict"]
        for state in (base[0] if isinstance(base, list) else base)["state"].values():
            for value in state.values():
                values = value.values() if isinstance(value, dict) else [value]
                out += [t for t in values if torch.is_tensor(t) and t.numel() > 1]
    return out


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_qlora_trains_only_adapters_on_a_4bit_base(tmp_path, tiny_pretrained, zero, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dtrain.config import load_run_config
    from dtrain.config.schema import PeftConfig
    from dtrain.export import logits_tolerance
    from dtrain.model import TORCH_DTYPES, keep_standard_4bit_layout, quantization_config

    run_dir = tmp_path / zero
    out = launch_train(
        SHORT
        + ["peft=qlora", f"zero={zero}", f"model.path={tiny_pretrained}", "model.init=pretrained", "train.max_steps=8", "train.lr=3e-3"],
        run_dir,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < losses[0] - 0.5, losses
    assert "28 linear layers quantised to 4-bit nf4 with double quantisation" in out.stdout
    precision = load_run_config(run_dir).precision.name  # what auto chose on this machine: reload and compare in it
    dtype = TORCH_DTYPES[precision]
    assert re.search(rf"in {precision.value} before quantisation -> [\d.]+ MiB after \([\d.]+x smaller\)", out.stdout)
    trainable = int(re.search(r"parameters: ([\d,]+) trainable", out.stdout).group(1).replace(",", ""))

    # Optimizer state exists for the LoRA parameters only: m and v over both ranks' partitions = trainable count.
    states = optimizer_tensors(run_dir, 8)
    assert sum(t.numel() for t in states) == 2 * trainable

    # The adapter loads onto a freshly quantised base and reproduces the engine's logits.
    assert "export verified:" in out.stdout
    probe = load_file(run_dir / "probe.safetensors")
    quant = quantization_config(PeftConfig(method="qlora"), dtype)
    base = AutoModelForCausalLM.from_pretrained(tiny_pretrained, dtype=dtype, quantization_config=quant)
    keep_standard_4bit_layout(base)
    model = PeftModel.from_pretrained(base, run_dir / "final").eval()
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
    real = probe["attention_mask"].bool()
    assert (logits[real] - probe["logits"][real]).abs().max() <= logits_tolerance(dtype, probe["logits"][real])

    if zero == "zero3":  # merged into a dequantised copy of the base in the run's dtype: plain transformers, no 4-bit layer
        # In this process, what `launch/export.py merge=true` runs (that command runs in test_train_launcher's LoRA case).
        from dtrain.export import merge_lora_run, parse_size

        with caplog.at_level(logging.INFO, logger="dtrain"):
            merge_lora_run(run_dir, run_dir / "merged", parse_size("5GB"))
        assert f"merging into a {precision.value} copy of the 4-bit base, dequantised" in caplog.text
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=dtype).eval()
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
        with torch.no_grad():
            merged_logits = merged(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
        assert (merged_logits[real] - logits[real]).abs().max() <= logits_tolerance(dtype, logits[real])


def test_adamw_8bit_quarter_state_bytes_and_same_loss_curve(tmp_path, two_rank_reference):
    """The 8-bit run against the session's 2-rank AdamW reference (``tests/integration/conftest.py``): the same 12
    steps of the same data from the same seeded weights, only the optimizer differs."""
    runs = {"adamw": two_rank_reference, "adamw_8bit": tmp_path / "adamw_8bit"}
    out = launch_train([*TWO_RANK_RUN, "zero=zero2", "optim=adamw_8bit"], runs["adamw_8bit"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    states = {optim: optimizer_tensors(run_dir, 12) for optim, run_dir in runs.items()}
    assert any(t.dtype == torch.uint8 for t in states["adamw_8bit"])
    assert all(t.dtype == torch.float32 for t in states["adamw"])
    ratio = sum(t.numel() * t.element_size() for t in states["adamw_8bit"]) / sum(t.numel() * t.element_size() for t in states["adamw"])
    assert 0.24 < ratio < 0.30, ratio  # 8-bit m and v + block scales; tensors under 4096 values stay fp32
    curves = {optim: [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] for optim, run_dir in runs.items()}
    assert len(curves["adamw_8bit"]) == 12 and curves["adamw"][-1] < curves["adamw"][0] - 2
    assert curves["adamw_8bit"] == pytest.approx(curves["adamw"], rel=0.02)

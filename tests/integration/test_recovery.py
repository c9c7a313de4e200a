"""Recovery on 2 CPU ranks through the deepspeed launcher, fp32: exact resume, preemption, kills, bad steps.

Faults are the real thing (a signal, a SIGKILL, an Inf loss), triggered at a chosen step and rank through the
``DTRAIN_FAULT_*`` variables of ``dtrain/faults.py``.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import launch_train, read_jsonl

pytestmark = pytest.mark.integration

SECRETS = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef", "HF_TOKEN": "hf_secret_0123456789abcdef"}
STEP_FIELDS = ("loss", "grad_norm", "lr", "tokens", "batch_fingerprint")


def chain_overrides(pretrained: Path) -> list[str]:
    # LoRA (dropout 0.05) so the resumed run must also restore every rank's RNG state to match bit for bit.
    return [
        "+exp=tiny_cpu",
        f"model.path={pretrained}",
        "model.init=pretrained",
        "peft=lora",
        "precision=fp32",
        "zero=zero2",
        "train.max_steps=20",
        "train.micro_batch_size=2",
        "train.warmup_ratio=0",
        "train.lr=1e-2",
        "train.eval_every=0",
        "generate.num_prompts=0",
        "generate.before_training=false",
        "ckpt.every_steps=4",
        "ckpt.keep_last=2",
    ]


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def test_exact_resume_after_preemption_kill_and_crashed_save(tmp_path, tiny_pretrained):
    overrides = chain_overrides(tiny_pretrained)
    straight, chain = tmp_path / "straight", tmp_path / "chain"

    out = launch_train(overrides, straight, env=SECRETS)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert checkpoint_names(straight) == ["step_00000016", "step_00000020"]  # 5 saves, keep_last=2
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    for f in straight.rglob("*"):  # secrets come from the environment only and never reach a run file
        if f.is_file() and f.stat().st_size < 10**6:
            text = f.read_bytes()
            assert not any(s.encode() in text for s in SECRETS.values()), f

    # 1) SIGTERM on rank 1 during step 6: every rank stops at the same boundary, saves step 6, exits 75.
    out = launch_train(overrides, chain, env={"DTRAIN_FAULT_SIGNAL": "6:1:TERM"})
    assert out.returncode == 75, out.stdout[-3000:] + out.stderr[-3000:]
    assert "exit code 75 (requeue)" in out.stderr
    assert checkpoint_names(chain) == ["step_00000004", "step_00000006"]

    # 2) Relaunch (resume=auto); rank 1 is SIGKILLed at the start of step 14: the job dies, step 12 is complete.
    out = launch_train(overrides, chain, env={"DTRAIN_FAULT_KILL": "14:1"})
    assert out.returncode not in (0, 75)
    assert "resumed from" in out.stdout and "step_00000006: step 6" in out.stdout
    assert checkpoint_names(chain) == ["step_00000008", "step_00000012"]

    # 3) Relaunch; rank 1 is SIGKILLed while writing checkpoint 16: that folder stays .partial, never "latest".
    out = launch_train(overrides, chain, env={"DTRAIN_FAULT_KILL_IN_SAVE": "16:1"})
    assert out.returncode not in (0, 75)
    assert "step_00000012: step 12" in out.stdout
    assert "step_00000016.partial" in checkpoint_names(chain)
    assert not (chain / "checkpoints" / "step_00000016.partial" / "COMPLETE.json").exists()
    assert (chain / "checkpoints" / "latest").read_text().strip() == "step_00000012"

    # 4) Relaunch: the partial save is reported and ignored; training resumes at 12 and finishes.
    out = launch_train(overrides, chain)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ignoring incomplete checkpoint" in out.stdout + out.stderr and "step_00000012: step 12" in out.stdout
    assert checkpoint_names(chain) == ["step_00000016", "step_00000020"]

    # Same batches, losses, gradient norms and learning rates at every step, bit for bit, and the same adapter.
    a, b = step_records(straight), step_records(chain)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 21))
    for ra, rb in zip(a, b):
        assert all(ra[k] == rb[k] for k in STEP_FIELDS), (ra, rb)
    adapter_a = load_file(straight / "final" / "adapter_model.safetensors")
    adapter_b = load_file(chain / "final" / "adapter_model.safetensors")
    assert adapter_a.keys() == adapter_b.keys() and all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)


def _tensors(obj, prefix=""):
    """Flatten nested dicts/lists of a DeepSpeed state file into {path: tensor}."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}/{k}"))
    return out


def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    run_dir = tmp_path / "inf"
    out = launch_train(
        [
            "+exp=tiny_cpu",
            "precision=fp32",
            "zero=zero2",
            "train.max_steps=4",
            "train.micro_batch_size=2",
            "train.warmup_ratio=0",
            "generate.num_prompts=0",
            "generate.before_training=false",
            "ckpt.every_steps=1",
            "ckpt.keep_last=0",
        ],
        run_dir,
        env={"DTRAIN_FAULT_NONFINITE_LOSS": "3:1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = step_records(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[2]["skipped"] == "nonfinite" and steps[2]["loss"] is None
    assert all(r.get("skipped") is None and r["loss"] > 0 for r in steps[:2] + steps[3:])
    assert "step 3: non-finite loss" in out.stdout + out.stderr and "train.jsonl:" in out.stdout + out.stderr
    assert json.loads((run_dir / "summary.json").read_text())["skipped_steps"] == 1

    # Weights and optimizer state after the skipped step 3 are bit-identical to those after step 2, on both ranks.
    ckpt = run_dir / "checkpoints"
    files = sorted(p.name for p in (ckpt / "step_00000002").glob("*.pt"))
    assert any("optim_states" in f for f in files) and any("model_states" in f for f in files)
    for name in files:
        before = torch.load(ckpt / "step_00000002" / name, map_location="cpu", weights_only=False)
        after = torch.load(ckpt / "step_00000003" / name, map_location="cpu", weights_only=False)
        key = "module" if "model_states" in name else "optimizer_state_dict"
        tb, ta = _tensors(before[key]), _tensors(after[key])
        assert tb and tb.keys() == ta.keys()
        assert all(torch.equal(tb[k], ta[k]) for k in tb), name
        after4 = _tensors(torch.load(ckpt / "step_00000004" / name, map_location="cpu", weights_only=False)[key])
        assert any(not torch.equal(tb[k], after4[k]) for k in tb), name  # step 4 did update


def test_stuck_rank_ends_the_job_naming_rank_and_step(tmp_path):
    """Rank 1 hangs at step 3; rank 0 waits in the step's all-reduce; the watchdogs end the job after 6 s.

    Both ranks beat at the start of step 3, so either watchdog may fire first; the launcher then stops the other
    rank before it can speak. Whichever fires names itself and the step."""
    out = launch_train(
        [
            "+exp=tiny_cpu",
            "train.max_steps=5",
            "train.micro_batch_size=2",
            "generate.num_prompts=0",
            "generate.before_training=false",
            "train.step_timeout_minutes=0.1",
        ],
        tmp_path / "hang",
        env={"DTRAIN_FAULT_HANG": "3:1"},
        timeout=180,
    )
    assert out.returncode == 86, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"rank [01] made no progress for \d+ s in step 3 \(train.step_timeout_minutes=0.1\)", out.stderr), out.stderr[-3000:]


def test_out_of_memory_stops_with_a_report_and_the_peer_names_its_step(tmp_path):
    out = launch_train(
        ["+exp=tiny_cpu", "train.max_steps=4", "train.micro_batch_size=2", "generate.num_prompts=0", "generate.before_training=false"],
        tmp_path / "oom",
        env={"DTRAIN_FAULT_OOM": "2:1"},
        timeout=180,
    )
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    assert "out of memory on rank 1 at step 2" in out.stderr
    for suggestion in (
        "train.micro_batch_size=1 train.grad_accum_steps=2",
        "model.gradient_checkpointing=true",
        "zero=zero3",
        "zero=zero2_offload",
        "peft=lora",
    ):
        assert suggestion in out.stderr
    assert "rank 0: a collective failed in step 2 because another rank died" in out.stderr

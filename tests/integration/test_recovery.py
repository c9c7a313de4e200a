"""Recovery on 2 CPU ranks through the deepspeed launcher, fp32: exact resume through every fault a run meets.

Faults are the real thing (a signal, a SIGKILL, an Inf loss, a full disk, a second job in the run directory),
triggered at a chosen step and rank through the ``DTRAIN_FAULT_*`` variables of ``dtrain/faults.py``. One
uninterrupted run is the reference; one chain of relaunches meets a preemption, a full disk in a checkpoint save, a
killed rank that leaves its lock behind, a rank killed while writing a checkpoint and a full disk during the export,
and still trains exactly the reference's steps and weights.
"""

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dtrain.errors import EXIT_DISK_FULL, EXIT_PREEMPTED, EXIT_RUN_DIR_BUSY

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
        "train.max_steps=12",
        "train.micro_batch_size=2",
        "train.warmup_ratio=0",
        "train.lr=1e-2",
        "train.eval_every=0",
        "generate.num_prompts=0",
        "generate.before_training=false",
        "ckpt.every_steps=2",
        "ckpt.keep_last=2",
    ]


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def errors(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (out.stdout + out.stderr).splitlines() if "dtrain: error:" in line]


def model_states(checkpoint: Path) -> dict[str, torch.Tensor]:
    (states,) = checkpoint.glob("*model_states.pt")
    return torch.load(states, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_pretrained):
    """The uninterrupted run (secrets in its environment); while it waits at step 3, a second job is launched into its
    run directory. Returns (run_dir, exit code, log, the second job's process)."""
    import threading

    base = tmp_path_factory.mktemp("recovery")
    run_dir, go = base / "straight", base / "go"
    env = {**SECRETS, "DTRAIN_FAULT_PAUSE": f"3:0:{go}"}
    first: dict = {}
    job = threading.Thread(target=lambda: first.update(out=launch_train(chain_overrides(tiny_pretrained), run_dir, env=env)))
    job.start()
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").is_file() and len(step_records(run_dir)) >= 2):
            assert job.is_alive() and time.monotonic() < deadline, "the first run ended before step 3"
            time.sleep(0.5)
        second = launch_train(chain_overrides(tiny_pretrained), run_dir, timeout=300)
    finally:
        go.touch()
        job.join(timeout=600)
    out = first["out"]
    return run_dir, out.returncode, out.stdout + out.stderr, second


def test_a_second_job_in_the_run_directory_is_refused_and_the_first_finishes_intact(straight):
    run_dir, code, log, second = straight
    assert second.returncode == EXIT_RUN_DIR_BUSY, second.stdout[-3000:] + second.stderr[-3000:]
    (line,) = errors(second)
    assert f"output_dir {run_dir} is in use by another job (host {socket.gethostname()}, PID " in line and "since 20" in line
    assert "Traceback" not in second.stderr

    assert code == 0, log[-5000:]
    assert [r["step"] for r in step_records(run_dir)] == list(range(1, 13))  # each step once: nobody cut or appended
    assert (run_dir / "train.log").read_text().count("starting fresh") == 1  # the refused job wrote no log line there
    assert checkpoint_names(run_dir) == ["step_00000010", "step_00000012"] and latest(run_dir) == "step_00000012"
    assert (run_dir / "final" / "adapter_model.safetensors").is_file() and not (run_dir / "dtrain.lock").exists()
    for f in run_dir.rglob("*"):  # secrets come from the environment only and never reach a run file
        if f.is_file() and f.stat().st_size < 10**6:
            text = f.read_bytes()
            assert not any(s.encode() in text for s in SECRETS.values()), f


def test_exact_resume_through_preemption_full_disks_kills_and_a_crashed_save(straight, tiny_pretrained, tmp_path):
    reference = straight[0]
    overrides, chain = chain_overrides(tiny_pretrained), tmp_path / "chain"

    # 1) SIGTERM on rank 1 during step 5: every rank stops at the same boundary, saves step 5, exits 75.
    out = launch_train(overrides, chain, env={"DTRAIN_FAULT_SIGNAL": "5:1:TERM"})
    assert out.returncode == EXIT_PREEMPTED, out.stdout[-3000:] + out.stderr[-3000:]
    assert "exit code 75 (requeue)" in out.stderr
    assert checkpoint_names(chain) == ["step_00000004", "step_00000005"]

    # 2) Relaunch; the disk fills while rank 1 writes checkpoint 6: every rank stops, step 5 stays latest.
    out = launch_train(overrides, chain, env={"DTRAIN_FAULT_ENOSPC": "checkpoint:6:1"})
    assert out.returncode == EXIT_DISK_FULL, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from" in out.stdout and "step_00000005: step 5" in out.stdout
    (line,) = errors(out)
    assert "no space left on device for checkpoint step 6 (rank 1): " in line and "step_00000006.partial/" in line
    assert "free on its filesystem, the write needs " in line and "Traceback" not in out.stderr
    assert checkpoint_names(chain) == ["step_00000004", "step_00000005"] and latest(chain) == "step_00000005"

    # 3) Relaunch; rank 0 (the lock's holder) is SIGKILLed at the start of step 9: its lock stays behind.
    out = launch_train(overrides, chain, env={"DTRAIN_FAULT_KILL": "9:0"})
    assert out.returncode not in (0, EXIT_PREEMPTED, EXIT_RUN_DIR_BUSY, EXIT_DISK_FULL), out.stdout[-3000:] + out.stderr[-3000:]
    assert "step_00000005: step 5" in out.stdout and (chain / "dtrain.lock").is_file()
    assert checkpoint_names(chain) == ["step_00000006", "step_00000008"]

    # 4) The resubmission takes the dead job's lock over; rank 1 is SIGKILLed while writing checkpoint 10: that folder
    # stays .partial, never "latest".
    out = launch_train(overrides, chain, env={"DTRAIN_FAULT_KILL_IN_SAVE": "10:1"})
    assert out.returncode not in (0, EXIT_PREEMPTED), out.stdout[-3000:] + out.stderr[-3000:]
    assert f"took over the lock {chain / 'dtrain.lock'}" in out.stdout and "step_00000008: step 8" in out.stdout
    assert "step_00000010.partial" in checkpoint_names(chain) and latest(chain) == "step_00000008"
    assert not (chain / "checkpoints" / "step_00000010.partial" / "COMPLETE.json").exists()

    # 5) Relaunch: the partial save is reported and ignored; training resumes at 8 and finishes; the disk fills
    # during the export: exit 28, nothing that looks like a finished export.
    out = launch_train(overrides, chain, env={"DTRAIN_FAULT_ENOSPC": "export:1"})
    assert out.returncode == EXIT_DISK_FULL, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ignoring incomplete checkpoint" in out.stdout + out.stderr and "step_00000008: step 8" in out.stdout
    (line,) = errors(out)
    assert f"no space left on device for the exported model: {chain / 'final.partial' / 'adapter_model.safetensors'}: " in line
    assert not (chain / "final").exists() and not (chain / "final.partial").exists() and not (chain / "dtrain.lock").exists()
    assert checkpoint_names(chain) == ["step_00000010", "step_00000012"] and latest(chain) == "step_00000012"

    # Same batches, losses, gradient norms and learning rates at every step, bit for bit, and the same weights.
    a, b = step_records(reference), step_records(chain)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b):
        assert all(ra[k] == rb[k] for k in STEP_FIELDS), (ra, rb)
    ours, theirs = model_states(chain / "checkpoints" / "step_00000012"), model_states(reference / "checkpoints" / "step_00000012")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


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

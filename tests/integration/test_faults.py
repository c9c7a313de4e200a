"""Faults around a run, on 2 CPU ranks through the deepspeed launcher, fp32: a full disk (checkpoint, export, token
store), a second job in the same run directory, a killed job's lock, a token store cut short or with a flipped byte.

The disk fills through ``DTRAIN_FAULT_ENOSPC`` (``dtrain/faults.py``): the write fails with ENOSPC after half its
bytes, as on a full filesystem. In each case the user reads one ``dtrain: error:`` line naming the cause, nothing
complete-looking is left half-written, and the resumed run follows the uninterrupted one bit for bit.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtrain.dist import free_port

from tests.conftest import REPO_ROOT, launch_train, read_jsonl

pytestmark = pytest.mark.integration

STEP_FIELDS = ("loss", "grad_norm", "lr", "tokens", "batch_fingerprint")


def overrides(pretrained: Path) -> list[str]:
    # LoRA with dropout: an exact resume must restore every rank's RNG state too.
    return [
        "+exp=tiny_cpu",
        f"model.path={pretrained}",
        "model.init=pretrained",
        "peft=lora",
        "precision=fp32",
        "zero=zero2",
        "train.max_steps=6",
        "train.micro_batch_size=2",
        "train.warmup_ratio=0",
        "train.lr=1e-2",
        "train.eval_every=0",
        "generate.num_prompts=0",
        "generate.before_training=false",
        "ckpt.every_steps=2",
        "ckpt.keep_last=2",
    ]


def errors(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (out.stdout + out.stderr).splitlines() if "dtrain: error:" in line]


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def model_states(checkpoint: Path) -> dict[str, torch.Tensor]:
    (states,) = checkpoint.glob("*model_states.pt")
    return torch.load(states, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_pretrained):
    """The uninterrupted run; while it waits at step 3, a second job is launched into its run directory."""
    base = tmp_path_factory.mktemp("faults")
    run_dir, go = base / "straight", base / "go"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "DTRAIN_FAULT_PAUSE": f"3:0:{go}"}
    first = subprocess.Popen(
        [*cmd, f"output_dir={run_dir}", *overrides(tiny_pretrained)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").is_file() and len(step_records(run_dir)) >= 2):
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended before step 3"
            time.sleep(0.5)
        second = launch_train(overrides(tiny_pretrained), run_dir, timeout=300)
    finally:
        go.touch()
    log, _ = first.communicate(timeout=600)
    return run_dir, first.returncode, log, second


def test_a_second_job_in_the_run_directory_is_refused_and_the_first_finishes_intact(straight):
    run_dir, code, log, second = straight
    assert second.returncode == 16, second.stdout[-3000:] + second.stderr[-3000:]
    (line,) = errors(second)
    assert f"output_dir {run_dir} is in use by another job (host {socket.gethostname()}, PID " in line and "since 20" in line
    assert "Traceback" not in second.stderr

    assert code == 0, log[-5000:]
    assert [r["step"] for r in step_records(run_dir)] == [1, 2, 3, 4, 5, 6]  # each step once: nobody cut or appended
    assert (run_dir / "train.log").read_text().count("starting fresh") == 1  # the refused job wrote no log line there
    assert checkpoint_names(run_dir) == ["step_00000004", "step_00000006"]
    assert (run_dir / "final" / "adapter_model.safetensors").is_file() and not (run_dir / "dtrain.lock").exists()


def test_full_disk_in_a_checkpoint_save_and_the_export_and_a_killed_jobs_lock(straight, tiny_pretrained, tmp_path):
    reference = straight[0]
    chain = tmp_path / "chain"

    # 1) The disk fills while rank 1 writes the second checkpoint (step 4): every rank stops, step 2 stays latest.
    out = launch_train(overrides(tiny_pretrained), chain, env={"DTRAIN_FAULT_ENOSPC": "checkpoint:4:1"})
    assert out.returncode == 28, out.stdout[-3000:] + out.stderr[-3000:]
    (line,) = errors(out)
    assert "no space left on device for checkpoint step 4 (rank 1): " in line and "step_00000004.partial/" in line
    assert "free on its filesystem, the write needs " in line and "Traceback" not in out.stderr
    assert checkpoint_names(chain) == ["step_00000002"] and latest(chain) == "step_00000002"

    # 2) Relaunched; rank 0 is SIGKILLed at the start of step 6 (checkpoint 4 is complete): its lock stays behind.
    out = launch_train(overrides(tiny_pretrained), chain, env={"DTRAIN_FAULT_KILL": "6:0"})
    assert out.returncode not in (0, 16, 28), out.stdout[-3000:] + out.stderr[-3000:]
    assert "step_00000002: step 2" in out.stdout and (chain / "dtrain.lock").is_file()

    # 3) The resubmission takes the dead job's lock over, resumes at step 4; the disk fills during the export.
    out = launch_train(overrides(tiny_pretrained), chain, env={"DTRAIN_FAULT_ENOSPC": "export:1"})
    assert out.returncode == 28, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"took over the lock {chain / 'dtrain.lock'}" in out.stdout and "is gone from" in out.stdout
    assert "step_00000004: step 4" in out.stdout
    (line,) = errors(out)
    assert f"no space left on device for the exported model: {chain / 'final.partial' / 'adapter_model.safetensors'}: " in line
    assert not (chain / "final").exists() and not (chain / "final.partial").exists() and not (chain / "dtrain.lock").exists()
    assert checkpoint_names(chain) == ["step_00000004", "step_00000006"] and latest(chain) == "step_00000006"

    # The interrupted chain followed the uninterrupted run: same batches, losses, norms, rates and weights.
    a, b = step_records(reference), step_records(chain)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert all(ra[k] == rb[k] for ra, rb in zip(a, b) for k in STEP_FIELDS), (a, b)
    ours, theirs = model_states(chain / "checkpoints" / "step_00000006"), model_states(reference / "checkpoints" / "step_00000006")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_token_store_full_disk_flipped_byte_and_cut_short(tmp_path, tiny_pretrained):
    short = ["+exp=tiny_cpu", f"model.path={tiny_pretrained}", "model.init=pretrained", "precision=fp32", "train.max_steps=2"]

    # The disk fills while the token store is written: exit 28, no store published (only its error note).
    cache = tmp_path / "cache"
    out = launch_train([*short, f"data.cache_dir={cache}"], tmp_path / "run", env={"DTRAIN_FAULT_ENOSPC": "store:1"})
    assert out.returncode == 28, out.stdout[-3000:] + out.stderr[-3000:]
    (line,) = errors(out)
    assert "no space left on device for the token store: " in line and "/train.ids: " in line
    assert [p for p in cache.iterdir() if p.is_dir()] == [] and not (tmp_path / "run" / "metrics.jsonl").exists()

    # Prepared ahead; a flipped byte keeps the size, so only --verify finds it.
    store = tmp_path / "store"
    prepare = [sys.executable, "launch/prepare.py", "+exp=tiny_cpu", f"data.prepared_path={store}"]
    out = subprocess.run(prepare, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ids = store / "train.ids"
    original = ids.read_bytes()
    ids.write_bytes(original[:1000] + bytes([original[1000] ^ 0x10]) + original[1001:])
    out = subprocess.run([*prepare, "--verify"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = errors(out)
    assert f"the token store {store} is damaged: {ids} has CRC-32 " in line and "Traceback" not in out.stderr

    # Cut short by 100 bytes: training refuses it on every rank before any step, naming the file and both sizes.
    ids.write_bytes(original[:-100])
    out = launch_train([*short, f"data.prepared_path={store}"], tmp_path / "run2")
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    (line,) = errors(out)
    assert f"{ids} has {len(original) - 100} bytes, meta.json says {len(original)}" in line
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()

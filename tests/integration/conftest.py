"""Reference runs that several integration files compare against, each launched at most once per test session.

A reference is launched the first time a test asks for it (running one file alone launches only what it needs)
and its run directory is shared read-only: tests that resume or extend a run copy it first. Under pytest-xdist
(``make test`` runs two workers) the workers share it too: the first to ask launches it under a file lock, the other
waits for it and reads the same directory.

- ``one_rank_reference("padded-full" | "packed-lora")``: 1 rank, micro 4 x accumulation 1, batches as drawn
  (``group_by_length=none``), ZeRO-2, fp32, the saved tiny model, 4 steps. The loss-invariance layouts and the
  sequence-parallel runs (same global batch of 4) must follow it step by step.
- ``two_rank_reference``: 2 ranks x micro 16 = 32 examples per step, ZeRO-2, fp32, seeded random weights, 12 steps.
  The elastic resumes, the two-node run and the ZeRO-1 and ZeRO-3 runs of test_train_launcher must follow it; the
  8-bit AdamW run of test_qlora stays within 2% of it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from tests.conftest import launch_train

REFERENCE_STEPS = 4
ONE_RANK_COMMON = [
    "+exp=tiny_cpu",
    "model.init=pretrained",
    "precision=fp32",
    f"train.max_steps={REFERENCE_STEPS}",
    "train.warmup_ratio=0",
    "train.eval_every=0",
    "generate.num_prompts=0",
    "generate.before_training=false",
    "data.max_seq_len=256",
]
"""What the 1-rank reference and every run compared with it share (the stage, layout and method come on top)."""
REFERENCE_LAYOUT = ["zero=zero2", "train.micro_batch_size=4", "train.grad_accum_steps=1", "data.group_by_length=none", "export.verify=none"]
METHODS = {
    "padded-full": ["data.packing=false", "peft=none"],
    # LoRA without dropout: a run that cuts rows (sequence parallelism) would draw other dropout masks.
    "packed-lora": ["data.packing=true", "peft=lora", "peft.dropout=0"],
}

TWO_RANK_RUN = [
    "+exp=tiny_cpu",
    "precision=fp32",
    "train.max_steps=12",
    "train.warmup_ratio=0",
    "train.eval_every=0",
    "generate.num_prompts=0",
    "generate.before_training=false",
    "export.verify=none",
]
"""The 2-rank reference's settings but its stage (ZeRO-2): tiny_cpu's micro 16 x accumulation 1, seeded random weights."""


def shared_run(tmp_path_factory, name: str, launch: Callable[[Path], None]) -> Path:
    """``launch(run_dir)`` once per test session, across pytest-xdist workers too; return ``run_dir``.

    The directory lies where every worker of this session sees it (the parent of a worker's base temp directory,
    which is the session's). A marker written after a successful launch tells later callers it is complete; a launch
    that failed leaves none, so the next caller launches again, into an emptied directory (a run directory that holds
    a checkpoint would be resumed), and shows its own failure.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    run_dir = root / "shared_runs" / name
    complete = run_dir.parent / f"{name}.complete"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(run_dir.parent / f"{name}.lock"):
        if not complete.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            launch(run_dir)
            complete.touch()
    return run_dir


def launch_ok(overrides: list[str], run_dir: Path, num_ranks: int) -> None:
    out = launch_train(overrides, run_dir, num_ranks=num_ranks)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.fixture(scope="session")
def one_rank_reference(tmp_path_factory, tiny_pretrained):
    """``reference(method) -> run_dir`` of the 1-rank reference for ``method`` (a key of ``METHODS``)."""

    def reference(method: str) -> Path:
        overrides = [*ONE_RANK_COMMON, f"model.path={tiny_pretrained}", *REFERENCE_LAYOUT, *METHODS[method]]
        return shared_run(tmp_path_factory, f"one_rank_{method}", lambda run_dir: launch_ok(overrides, run_dir, 1))

    return reference


@pytest.fixture(scope="session")
def two_rank_reference(tmp_path_factory) -> Path:
    """The uninterrupted 12-step 2-rank run (see the module docstring)."""
    return shared_run(tmp_path_factory, "two_rank", lambda run_dir: launch_ok([*TWO_RANK_RUN, "zero=zero2"], run_dir, 2))

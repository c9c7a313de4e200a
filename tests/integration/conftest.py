"""Reference runs that several integration files compare against, each launched at most once per test session.

A reference is launched the first time a test asks for it (running one file alone launches only what it needs)
and its run directory is shared read-only: tests that resume or extend a run copy it first.

- ``one_rank_reference("padded-full" | "packed-lora")``: 1 rank, micro 4 x accumulation 1, batches as drawn
  (``group_by_length=none``), ZeRO-2, fp32, the saved tiny model, 4 steps. The loss-invariance layouts and the
  sequence-parallel runs (same global batch of 4) must follow it step by step.
- ``two_rank_reference``: 2 ranks x micro 16 = 32 examples per step, ZeRO-2, fp32, seeded random weights, 12 steps.
  The elastic resumes, the two-node run and the ZeRO-1 and ZeRO-3 runs of test_train_launcher must follow it; the
  8-bit AdamW run of test_qlora stays within 2% of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def one_rank_reference(tmp_path_factory, tiny_pretrained):
    """``reference(method) -> run_dir`` of the 1-rank reference for ``method`` (a key of ``METHODS``)."""
    root = tmp_path_factory.mktemp("one_rank_references")
    done: dict[str, Path] = {}

    def reference(method: str) -> Path:
        if method not in done:
            run_dir = root / method
            overrides = [*ONE_RANK_COMMON, f"model.path={tiny_pretrained}", *REFERENCE_LAYOUT, *METHODS[method]]
            out = launch_train(overrides, run_dir, num_ranks=1)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            done[method] = run_dir
        return done[method]

    return reference


@pytest.fixture(scope="session")
def two_rank_reference(tmp_path_factory) -> Path:
    """The uninterrupted 12-step 2-rank run (see the module docstring)."""
    run_dir = tmp_path_factory.mktemp("two_rank_reference") / "run"
    out = launch_train([*TWO_RANK_RUN, "zero=zero2"], run_dir, num_ranks=2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir

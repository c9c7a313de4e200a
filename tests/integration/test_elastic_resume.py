"""Elastic resume: a run continues on another world size, node count, ZeRO stage or offload setting and trains
exactly what it would have trained.

Each case: an uninterrupted 12-step run; the same run stopped by a preemption signal after step 7 (checkpoint,
exit 75); then resumed on another layout (converted to DeepSpeed's universal format on the way when the ZeRO
partitions no longer fit; a two-node run resumed on one node with as many ranks loads as it is). Steps 8-12 of the
resumed run have the reference's batch fingerprints and token counts, and its losses and gradient norms within
1e-6 (fp32, no dropout). The global batch stays 32: the accumulation steps follow the world size. Each resume
changes several things at once: 2 ranks with the optimizer offloaded (DeepSpeed's CPU Adam, its step counts plain
ints) -> 1 rank on the device (torch's AdamW; the two optimizers agree to ~1e-7 over these 12 steps); 1 rank
ZeRO-1 -> 2 ranks ZeRO-3; two nodes -> one; LoRA on 2 ranks ZeRO-2 -> 1 rank ZeRO-3 after an offline conversion
(that case resumes from the step-7 checkpoint the reference saved on its way, ``ckpt.every_steps=7``).
The resumes into ZeRO-3 and out of optimizer offload also check ``dtrain.reshard.repair_optimizer_steps``:
DeepSpeed 0.19.8's ZeRO-3 universal load gives all partitions one shared Adam step counter (without the repair the
losses drifted by ~6e-4 within 4 steps), and its CPU Adam's int step counts crash torch's AdamW. What may not change
(the global batch; any layout under ``ckpt.reshard=never``) is refused before any model loads
(``tests/unit/test_checkpoint.py``).
"""

import pytest

from dtrain.errors import EXIT_PREEMPTED
from dtrain.metrics import read_metrics

from tests.conftest import launch_train, launch_two_nodes
from tests.integration.conftest import TWO_RANK_RUN

pytestmark = pytest.mark.integration

RUN = TWO_RANK_RUN
STOP_AFTER_7 = {"DTRAIN_FAULT_SIGNAL": "7:0:TERM"}  # rank 0 gets SIGTERM in step 7: all ranks save after it and stop


def launch(run_dir, overrides, ranks, env=None, expect=0):
    out = launch_train(RUN + overrides, run_dir, num_ranks=ranks, env=env)
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def assert_same_steps(resumed_dir, reference_dir, from_step=8):
    """Steps from ``from_step`` on: the same data, and the same losses and gradient norms."""
    reference = {r.step: r for r in read_metrics(reference_dir).steps}
    resumed = [r for r in read_metrics(resumed_dir).steps if r.step >= from_step]
    assert [r.step for r in resumed] == list(range(from_step, 13))
    for r in resumed:
        ref = reference[r.step]
        assert (r.batch_fingerprint, r.tokens, r.input_tokens) == (ref.batch_fingerprint, ref.tokens, ref.input_tokens), r.step
        assert r.loss == pytest.approx(ref.loss, rel=1e-6), r.step
        assert r.grad_norm == pytest.approx(ref.grad_norm, rel=1e-6), r.step


@pytest.fixture(scope="module")
def reference(two_rank_reference):
    """The uninterrupted full fine-tuning run: 12 steps, 2 ranks, ZeRO-2 (the session's shared 2-rank reference)."""
    return two_rank_reference


def test_an_offloaded_run_resumes_on_fewer_ranks_on_the_device(tmp_path, reference):
    stopped = tmp_path / "offloaded_two_to_one"
    launch(stopped, ["zero=zero2_offload"], ranks=2, env=STOP_AFTER_7, expect=EXIT_PREEMPTED)
    # 2 -> 1 rank: the accumulation doubles, the checkpoint is converted (once), every step is the same.
    out = launch(stopped, ["zero=zero2"], ranks=1)
    assert "world_size 2 -> 1" in out.stdout and "train.grad_accum_steps=2 (was 1)" in out.stdout
    assert "zero.offload_optimizer True -> False" in out.stdout and "made tensors for AdamW" in out.stdout
    universal = stopped / "checkpoints" / "step_00000007" / "universal" / "CONVERTED"
    assert "(universal): step 7" in out.stdout and universal.is_file()
    assert_same_steps(stopped, reference)


def test_one_rank_zero1_resumes_on_two_ranks_zero3(tmp_path, reference):
    stopped = tmp_path / "stopped"  # 1 rank x 2 accumulation: the reference's global batch, so its curve
    launch(stopped, ["zero=zero1", "train.grad_accum_steps=2"], ranks=1, env=STOP_AFTER_7, expect=EXIT_PREEMPTED)
    out = launch(stopped, ["zero=zero3"], ranks=2)
    assert "world_size 1 -> 2" in out.stdout and "zero.stage 1 -> 3" in out.stdout and "train.grad_accum_steps 2 -> 1" in out.stdout
    assert "(universal): step 7" in out.stdout
    assert "shared one Adam step counter" in out.stdout  # the decay and no-decay groups: two partitions, one tensor
    # From step 1: seeded random weights built on 1 rank under ZeRO-1 are the reference's (ZeRO-2, 2 ranks).
    assert_same_steps(stopped, reference, from_step=1)


@pytest.mark.extended  # the other direction (offload -> none) runs in the default suite
def test_a_run_resumes_with_its_optimizer_offloaded(tmp_path, reference):
    stopped = tmp_path / "device_to_offload"
    launch(stopped, ["zero=zero2"], ranks=2, env=STOP_AFTER_7, expect=EXIT_PREEMPTED)
    out = launch(stopped, ["zero=zero2_offload"], ranks=2)
    assert "zero.offload_optimizer False -> True" in out.stdout and "(universal): step 7" in out.stdout
    assert_same_steps(stopped, reference)


def test_a_two_node_run_trains_like_one_node_and_resumes_as_one_launcher(tmp_path, reference):
    """Two ``deepspeed --no_ssh`` launchers (``--num_nodes 2 --node_rank 0/1``, one rank each) train together like one
    launcher with two ranks (steps 1-7 follow the reference), are stopped after step 7, and resume as one launcher
    with 2 ranks (steps 8-12). On the way: overrides with brackets and ``${}`` reach every rank unchanged, and the
    token store is prepared by one node only (a fresh cache folder both nodes share)."""
    run_dir = tmp_path / "two_nodes"
    shared = [f"data.cache_dir={tmp_path / 'cache'}", "wandb.tags=[node,two]", "run_name=two_${train.seed}", "zero=zero2"]
    nodes = launch_two_nodes([*RUN, *shared], run_dir, tmp_path / "hosts", env=STOP_AFTER_7)
    logs = [log for _, log in nodes]
    assert [code for code, _ in nodes] == [EXIT_PREEMPTED] * 2, logs[0][-2000:] + logs[1][-2000:]
    assert "16 micro x 1 accumulation x 2 data-parallel ranks = 32 examples per optimizer step" in logs[0]
    # One node prepares the store, the other waits for it: only global rank 0 logs, and which node claims the store
    # first is a race, so rank 0 says it prepared it, waited for the other node, or found it ready.
    how = ("preparing the token store", "another node of this job is preparing", "(prepared before)")
    assert len([line for line in logs[0].splitlines() if any(s in line for s in how)]) == 1, logs[0][-3000:]
    assert "".join(logs).count("preparing the token store") <= 1, "each node prepared the shared data"
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1  # one store, written once
    config = (run_dir / "config.yaml").read_text()
    assert "run_name: two_42" in config and "  - node\n  - two\n" in config  # brackets and ${} arrived unchanged

    out = launch(run_dir, shared, ranks=2)
    assert "nodes 2 -> 1" in out.stdout and "an ordinary load, no conversion" in out.stdout and "(universal)" not in out.stdout
    assert_same_steps(run_dir, reference, from_step=1)  # both halves: the two-node steps and the resumed ones


def test_lora_resumes_on_one_rank_under_zero3_after_an_offline_conversion(tmp_path, tiny_pretrained):
    """The reference saves a checkpoint at step 7 on its way (``ckpt.every_steps``): converted offline
    (``launch/convert_ckpt.py checkpoint=...``), it is where the resumed run starts (``ckpt.resume=<folder>``)."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    lora = ["peft=lora", f"model.path={tiny_pretrained}", "model.init=pretrained", "peft.dropout=0"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    launch(reference, [*lora, "zero=zero2", "ckpt.every_steps=7"], ranks=2)
    step_7 = reference / "checkpoints" / "step_00000007"
    converted = subprocess.run(
        [sys.executable, "launch/convert_ckpt.py", f"run_dir={reference}", f"checkpoint={step_7}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert f"universal checkpoint: {step_7 / 'universal'}" in converted.stdout
    out = launch(resumed, [*lora, "zero=zero3", f"ckpt.resume={step_7}"], ranks=1)
    assert "already converted: reused" in out.stdout and "(universal): step 7" in out.stdout
    assert_same_steps(resumed, reference)

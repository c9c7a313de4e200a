"""Ulysses sequence parallelism is exact: ``parallel.sp_size=2`` on 2 ranks follows 1 rank without it, step by step.

Same global batch (micro 2 x accumulation 2 x 1 data-parallel rank, against the reference's micro 4 x 1), fp32, 4
steps: the same examples per step, the loss within 1e-5 and the gradient norm within 1e-4 (relative), and the same
final eval loss. Sequence-parallel launches against the two shared 1-rank references (ZeRO-2,
``tests/integration/conftest.py``, shared with the loss-invariance tests) cover each axis at least once:

    padded, full fine-tuning, ZeRO-3     (padded-full; ZeRO-3's reduce-scatter averaging, see gradient_divisor)
    packed, LoRA,             ZeRO-3     (packed-lora; block-diagonal attention across the pieces)
    padded, full, ZeRO-3 + tiled MLP + activation offload + chunked loss (padded-full)
    padded, full, ZeRO-2, stopped and resumed (padded-full)
    padded, full, ZeRO-2, 4 ranks as sp 2 x dp 2 (padded-full)

LoRA runs with ``peft.dropout=0``: a dropout mask is drawn per piece under sequence parallelism, so the two runs
would draw different masks. The pretrained model's heads (4) split over 2 ranks; gradient clipping is active (norms
above 1), so a wrongly scaled gradient would show in the norm even where Adam hides it in the loss.
"""

import json
from itertools import islice

import pytest

from dtrain.config import compose_job
from dtrain.config.batch import BatchPlan
from dtrain.data import ChatRenderer, prepare_data
from dtrain.data.loader import TrainLoader
from dtrain.loss import count_trained_tokens
from dtrain.metrics import read_metrics
from dtrain.model import load_tokenizer

from tests.conftest import launch_train
from tests.integration.conftest import METHODS, ONE_RANK_COMMON, REFERENCE_STEPS

pytestmark = pytest.mark.integration

STEPS = REFERENCE_STEPS
COMMON = [*ONE_RANK_COMMON, "train.micro_batch_size=2", "train.grad_accum_steps=2"]
PADDED_FULL, PACKED_LORA = METHODS["padded-full"], METHODS["packed-lora"]
CASES = {  # name: (reference, overrides of the sequence-parallel run); ZeRO-2 with SP: the resume and 4-rank tests
    "padded-full-zero3": ("padded-full", [*PADDED_FULL, "zero=zero3"]),
    "packed-lora-zero3": ("packed-lora", [*PACKED_LORA, "zero=zero3"]),
}


@pytest.fixture(scope="module")
def references(one_rank_reference):
    """``references[method]``: the shared 1-rank curve without sequence parallelism, launched on first use."""

    class Curves(dict):
        def __missing__(self, method):
            self[method] = read_metrics(one_rank_reference(method))
            return self[method]

    return Curves()


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_parallel_run_follows_the_run_without_it(tmp_path, tiny_pretrained, references, case):
    reference_name, overrides = CASES[case]
    out = launch_train([*COMMON, f"model.path={tiny_pretrained}", *overrides, "parallel.sp_size=2"], tmp_path / "run", num_ranks=2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "each row cut into 2 pieces" in out.stdout
    got, want = read_metrics(tmp_path / "run"), references[reference_name]
    assert [r.step for r in got.steps] == [r.step for r in want.steps] == list(range(1, STEPS + 1))
    for mine, ref in zip(got.steps, want.steps):
        # The same examples, and every trained token counted once over the group.
        assert (mine.tokens, mine.input_tokens, mine.batch_fingerprint) == (ref.tokens, ref.input_tokens, ref.batch_fingerprint)
        assert mine.loss == pytest.approx(ref.loss, rel=1e-5), mine.step
        assert mine.grad_norm == pytest.approx(ref.grad_norm, rel=1e-4), mine.step
        # Throughput and MFU count the step's FLOPs once, attention over whole sequences: the same as without SP.
        flops, ref_flops = mine.tflops_per_gpu * mine.step_time_s * 2, ref.tflops_per_gpu * ref.step_time_s
        assert flops == pytest.approx(ref_flops, rel=1e-6), mine.step
    assert max(r.grad_norm for r in want.steps) > 1.0  # clipping is on: a mis-scaled gradient shows in the norm
    assert got.evals[-1].eval_loss == pytest.approx(want.evals[-1].eval_loss, rel=1e-5)


def test_the_padded_runs_above_train_pieces_without_a_trained_token(tiny_pretrained):
    """The first half of a padded row is mostly prompt: some pieces carry no trained token, and the padded runs above
    are exact with them (their loss is an exact zero that still runs backward through the model). Packed rows of
    256 tokens hold answers in every piece."""
    packing = False
    job = compose_job([*COMMON, f"model.path={tiny_pretrained}", *PADDED_FULL])
    tokenizer = load_tokenizer(job.model)
    data = prepare_data(job.data, ChatRenderer(tokenizer, job.data.train_on), job.train.seed, num_prompts=0)
    plan = BatchPlan.from_config(job.train, world_size=2, sp_size=2)
    empty = 0
    for rank in (0, 1):
        loader = TrainLoader(
            data.train,
            plan,
            rank,
            packing=packing,
            max_seq_len=job.data.max_seq_len,
            seed=job.train.seed,
            grouping=job.data.group_by_length,
            pad_token_id=tokenizer.pad_token_id,
        )
        steps = loader.step_batches(0)
        empty += sum(count_trained_tokens(m["targets"]) == 0 for step in islice(steps, STEPS) for m in step.micro_batches)
        steps.close()
    assert empty > 0


def test_the_whole_long_sequence_stack_follows_the_plain_run(tmp_path, tiny_pretrained, references):
    """Sequence parallelism, tiled MLP (tiles of 16 tokens: 4+ tiles per piece, the count agreed over the ranks),
    activation offload with recomputation, and the chunked loss head, together under ZeRO-3: the curve of the plain
    1-rank run (reference A). Activations are measured once and land within 15% of the plan."""
    stack = ["model.tiled_mlp=true", "model.tiled_mlp_tokens=16", "model.gradient_checkpointing=true", "model.activation_offload=true"]
    stack += ["train.loss_chunk_size=64", "train.measure_activations=true"]
    overrides = [*COMMON, f"model.path={tiny_pretrained}", *PADDED_FULL, "zero=zero3", "parallel.sp_size=2", *stack]
    out = launch_train(overrides, tmp_path / "run", num_ranks=2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "tiled MLP: 4 MLPs run in tiles of about 16 tokens per row" in log and "activation offload:" in log
    got, want = read_metrics(tmp_path / "run"), references["padded-full"]
    for mine, ref in zip(got.steps, want.steps):
        assert (mine.tokens, mine.batch_fingerprint) == (ref.tokens, ref.batch_fingerprint)
        assert mine.loss == pytest.approx(ref.loss, rel=1e-5), mine.step
        assert mine.grad_norm == pytest.approx(ref.grad_norm, rel=1e-4), mine.step
    activations = json.loads((tmp_path / "run" / "memory.json").read_text())["activations_rank0"]
    assert activations["planned_bytes"] == pytest.approx(activations["measured_bytes"], rel=0.15), activations


def test_a_sequence_parallel_run_resumes_exactly(tmp_path, tiny_pretrained, references):
    """ZeRO-2 with sp_size=2, stopped by SIGTERM at step 2 (a checkpoint there, exit 75) and resumed: all four steps
    follow the plain run (reference A), the two resumed ones included."""
    overrides = [*COMMON, f"model.path={tiny_pretrained}", *PADDED_FULL, "zero=zero2", "parallel.sp_size=2"]
    out = launch_train(overrides, tmp_path / "chain", num_ranks=2, env={"DTRAIN_FAULT_SIGNAL": "2:1:TERM"})
    assert out.returncode == 75, out.stdout[-3000:] + out.stderr[-3000:]
    out = launch_train(overrides, tmp_path / "chain", num_ranks=2)
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    got = {r.step: r for r in read_metrics(tmp_path / "chain").steps}
    assert sorted(got) == list(range(1, STEPS + 1))
    for ref in references["padded-full"].steps:
        mine = got[ref.step]
        assert (mine.tokens, mine.batch_fingerprint) == (ref.tokens, ref.batch_fingerprint), ref.step
        assert mine.loss == pytest.approx(ref.loss, rel=1e-5) and mine.grad_norm == pytest.approx(ref.grad_norm, rel=1e-4), ref.step


@pytest.mark.extended  # 4 ranks on the 2-core CI machine; the 2-rank SP cases run in the default suite
def test_four_ranks_as_two_sequence_parallel_groups_follow_the_plain_run(tmp_path, tiny_pretrained, references):
    """sp 2 x dp 2 on 4 ranks (micro 2 x accumulation 1 x dp 2) against the plain 1-rank run (micro 2 x accumulation
    2): the same global batch, so the same examples per step (the loss-invariance tests hold the layouts equal)."""
    overrides = [*COMMON, f"model.path={tiny_pretrained}", *PADDED_FULL, "zero=zero2", "train.grad_accum_steps=1"]
    out = launch_train([*overrides, "parallel.sp_size=2"], tmp_path / "sp2dp2", num_ranks=4)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "x 2 data-parallel ranks" in out.stdout + out.stderr
    for mine, ref in zip(read_metrics(tmp_path / "sp2dp2").steps, references["padded-full"].steps):
        assert (mine.tokens, mine.input_tokens, mine.batch_fingerprint) == (ref.tokens, ref.input_tokens, ref.batch_fingerprint)
        assert mine.loss == pytest.approx(ref.loss, rel=1e-5), mine.step
        assert mine.grad_norm == pytest.approx(ref.grad_norm, rel=1e-4), mine.step

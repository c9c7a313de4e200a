"""The step loss is the global token mean: it does not depend on micro-batch size, accumulation or world size.

fp32, the same data order: the shared 1-rank reference (micro 4, accumulation 1, micro-batches as drawn) and
(micro 1, accumulation 2, 2 ranks) with each step's examples sorted by length before the split
(``data.group_by_length=within_step``, the default): micro-batch size, accumulation and world size all differ, for
padded batches (full fine-tuning) and packed rows (LoRA). The sequence-parallel tests add micro 2 x accumulation 2 on
one data-parallel rank against the same references. Equal gradient norms at step 1 and equal losses after it mean
equal gradients and updates.
"""

import pytest

from tests.conftest import launch_train, read_jsonl
from tests.integration.conftest import METHODS, ONE_RANK_COMMON, REFERENCE_STEPS

pytestmark = pytest.mark.integration

LAYOUTS = [(2, 1, 2)]  # (ranks, micro, accumulation), grouped within the step: each of the three differs from the reference


def curve(run_dir) -> list[tuple]:
    return [(r["loss"], r["grad_norm"], r["tokens"], r["batch_fingerprint"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("method", list(METHODS))
def test_loss_curve_is_independent_of_batch_layout(tmp_path, tiny_pretrained, one_rank_reference, method):
    reference = curve(one_rank_reference(method))
    assert len(reference) == REFERENCE_STEPS
    for ranks, micro, accum in LAYOUTS:
        run_dir = tmp_path / f"r{ranks}_m{micro}_a{accum}"
        overrides = [
            *ONE_RANK_COMMON,
            f"model.path={tiny_pretrained}",
            *METHODS[method],
            "zero=zero2",
            f"train.micro_batch_size={micro}",
            f"train.grad_accum_steps={accum}",
            "data.group_by_length=within_step",
        ]
        out = launch_train(overrides, run_dir, num_ranks=ranks)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        got = curve(run_dir)
        assert len(got) == REFERENCE_STEPS
        for (loss, norm, tokens, batch), (ref_loss, ref_norm, ref_tokens, ref_batch) in zip(got, reference):
            assert tokens == ref_tokens and batch == ref_batch, (ranks, micro, accum)  # the same examples in every step
            assert loss == pytest.approx(ref_loss, rel=1e-6), (ranks, micro, accum)
            assert norm == pytest.approx(ref_norm, rel=1e-5), (ranks, micro, accum)

"""The step loss is the global token mean: it does not depend on micro-batch size, accumulation or world size.

Three launches over the same data order, fp32: (micro 4, accum 1, 1 rank) with micro-batches as drawn, and
(micro 2, accum 2, 1 rank) and (micro 1, accum 2, 2 ranks) with each step's examples sorted by length before the
split (``data.group_by_length=within_step``, the default), with padded batches and with packed rows. Equal
gradient norms at step 1 and equal losses after it mean equal gradients and equal updates.
"""

import pytest

from tests.conftest import launch_train, read_jsonl

pytestmark = pytest.mark.integration

LAYOUTS = [(1, 4, 1, "none"), (1, 2, 2, "within_step"), (2, 1, 2, "within_step")]  # (ranks, micro, accum, grouping)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_loss_curve_is_independent_of_batch_layout(tmp_path, tiny_pretrained, packing):
    curves = {}
    for ranks, micro, accum, grouping in LAYOUTS:
        run_dir = tmp_path / f"r{ranks}_m{micro}_a{accum}_{grouping}"
        out = launch_train(
            [
                "+exp=tiny_cpu",
                f"model.path={tiny_pretrained}",
                "model.init=pretrained",
                "precision=fp32",
                "zero=zero2",
                "train.max_steps=5",
                f"train.micro_batch_size={micro}",
                f"train.grad_accum_steps={accum}",
                "train.warmup_ratio=0",
                "generate.num_prompts=0",
                "generate.before_training=false",
                f"data.packing={packing}",
                f"data.group_by_length={grouping}",
                "data.max_seq_len=256",
            ],
            run_dir,
            num_ranks=ranks,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
        curves[(ranks, micro, accum, grouping)] = [(r["loss"], r["grad_norm"], r["tokens"], r["batch_fingerprint"]) for r in steps]
    reference = curves[LAYOUTS[0]]
    assert len(reference) == 5
    for layout, curve in curves.items():
        for (loss, norm, tokens, batch), (ref_loss, ref_norm, ref_tokens, ref_batch) in zip(curve, reference):
            assert tokens == ref_tokens and batch == ref_batch, layout  # the same examples in every step
            assert loss == pytest.approx(ref_loss, rel=1e-6), layout
            assert norm == pytest.approx(ref_norm, rel=1e-5), layout

"""model.init=random with one seed builds one model, whatever the ZeRO stage and world size.

Before, ZeRO-3 (weights built inside zero.Init) drew a different model than ZeRO-1/2 from the same seed, so
random-weight benchmarks and the demo compared different models across stages. ZeRO-3 on 2 ranks against the
shared 2-rank ZeRO-2 reference (same global batch): the first step's loss (computed on the initial weights) and
gradient norm agree. Across world sizes: the 1-rank ZeRO-3 run of tests/integration/test_elastic_resume.py follows
the same reference from step 1.
"""

import pytest

from dtrain.metrics import read_metrics

from tests.conftest import launch_train
from tests.integration.conftest import TWO_RANK_RUN

pytestmark = pytest.mark.integration


def test_seeded_random_weights_do_not_depend_on_the_zero_stage(tmp_path, two_rank_reference):
    run_dir = tmp_path / "zero3"
    out = launch_train([*TWO_RANK_RUN, "zero=zero3", "train.max_steps=1"], run_dir, num_ranks=2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (step,) = read_metrics(run_dir).steps
    reference = read_metrics(two_rank_reference).steps[0]
    assert (step.tokens, step.batch_fingerprint) == (reference.tokens, reference.batch_fingerprint)
    assert step.loss == pytest.approx(reference.loss, rel=1e-9)
    assert step.grad_norm == pytest.approx(reference.grad_norm, rel=1e-6)

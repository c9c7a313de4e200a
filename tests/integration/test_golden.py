"""The embedded default trains exactly as it did: a committed fp32 loss curve guards every restructuring.

tests/golden/tiny_cpu_fp32.json was recorded before the code it now checks was reorganised (scripts/make_golden.py
remakes it, for changes meant to change training). fp32 on 2 CPU ranks: the same data per step (trained and input
token counts, exact), the same losses (1e-5 relative) and gradient norms (1e-3: summation order across CPUs).
"""

import json
from pathlib import Path

import pytest

from dtrain.metrics import read_metrics

from tests.conftest import launch_train

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_cpu_fp32.json"


def test_embedded_default_follows_the_golden_curve(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    out = launch_train(golden["overrides"], tmp_path / "run", num_ranks=golden["num_ranks"], via_command=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert [r.step for r in metrics.steps] == [s["step"] for s in golden["steps"]]
    for got, want in zip(metrics.steps, golden["steps"]):
        assert (got.tokens, got.input_tokens) == (want["tokens"], want["input_tokens"]), got.step
        assert got.lr == pytest.approx(want["lr"], rel=1e-12), got.step
        assert got.loss == pytest.approx(want["loss"], rel=1e-5), got.step
        assert got.grad_norm == pytest.approx(want["grad_norm"], rel=1e-3), got.step
    assert [(e.step, e.eval_tokens) for e in metrics.evals] == [(e["step"], e["eval_tokens"]) for e in golden["evals"]]
    for got, want in zip(metrics.evals, golden["evals"]):
        assert got.eval_loss == pytest.approx(want["eval_loss"], rel=1e-5)

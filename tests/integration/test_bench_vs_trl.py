"""bench/vs_trl.py in smoke mode: dtrain and TRL's SFTTrainer, 3 steps each on 2 CPU ranks, so the benchmark cannot rot.

Same model, data, masks and batches on both sides, so the first-step losses (before any update) must agree.
"""

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration


@pytest.mark.extended  # a peer's trainer, imported and run: kept out of the default suite for its time (40 s)
def test_vs_trl_smoke(tmp_path):
    pytest.importorskip("trl", reason="pip install -e '.[bench]'")
    out = tmp_path / "vs_trl.json"
    proc = subprocess.run(
        [sys.executable, "bench/vs_trl.py", "--smoke", "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    dtrain, trl = results["dtrain"], results["trl"]
    assert dtrain["steps"] == trl["steps"] == results["config"]["steps"]
    for run in (dtrain, trl):
        assert all(math.isfinite(step["loss"]) for step in run["per_step"])
        assert run["trained_tokens_total"] > 0
    assert results["same_batches"]
    assert results["mask_check"]["labels_equal"] == results["mask_check"]["examples"] > 0
    assert dtrain["first_loss"] == pytest.approx(trl["first_loss"], rel=0.05)
    assert results["ratios"]["time_per_epoch"] > 0 and results["ratios"]["trained_tokens_per_s"] > 0

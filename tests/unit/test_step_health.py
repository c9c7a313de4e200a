"""Non-finite and spiking steps, preemption signals and the step watchdog, each in one process."""

import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from dtrain.errors import EXIT_HUNG, TrainingError
from dtrain.guard import SPIKE_MIN_HISTORY, StepGuard
from dtrain.metrics import _drop_records_after
from dtrain.preemption import PreemptionFlag


def test_nonfinite_steps_counted_and_stop_after_max_bad_steps():
    guard = StepGuard(max_bad_steps=3, spike_factor=10.0)
    assert guard.classify(math.inf, step_applied=False, fp16=False) == "nonfinite"
    assert guard.classify(math.nan, step_applied=False, fp16=False) == "nonfinite"
    assert guard.classify(2.0, step_applied=True, fp16=False) == "ok"  # a good step resets the count
    assert guard.bad_in_a_row == 0
    guard.classify(math.inf, False, False), guard.classify(math.inf, False, False)
    with pytest.raises(TrainingError, match=r"3 optimizer steps in a row.*max_bad_steps=3"):
        guard.classify(math.nan, False, False)


def test_finite_loss_with_skipped_update_is_fp16_overflow_or_bad_gradient():
    guard = StepGuard(max_bad_steps=5, spike_factor=10.0)
    assert guard.classify(3.0, step_applied=False, fp16=True) == "overflow"
    assert guard.bad_in_a_row == 0  # loss scaling handles overflow; it is not a bad step
    assert guard.classify(3.0, step_applied=False, fp16=False) == "nonfinite"  # NaN/Inf gradient norm in bf16/fp32


def test_applied_update_with_nonfinite_loss_is_an_error():
    with pytest.raises(TrainingError, match="applied the update"):
        StepGuard(5, 10.0).classify(math.nan, step_applied=True, fp16=False)


def test_spike_against_running_median():
    guard = StepGuard(max_bad_steps=5, spike_factor=10.0)
    for _ in range(SPIKE_MIN_HISTORY):
        assert guard.classify(1.0, True, False) == "ok"
    assert guard.classify(9.0, True, False) == "ok"
    assert guard.classify(10.5, True, False) == "spike"
    assert StepGuard(5, 10.0, recent=guard.recent).recent == guard.recent  # restored from a checkpoint


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_sets_the_agreed_flag(sig):
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        flag = PreemptionFlag(torch.device("cpu"))
        assert flag.agreed() == (False, False) and flag.agreed(failed=True) == (False, True)
        os.kill(os.getpid(), sig)
        assert flag.agreed() == (True, False) and flag.signal_name == sig.name
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_watchdog_ends_a_stuck_rank_naming_rank_and_step():
    code = (
        "import time; from dtrain.watchdog import StepWatchdog; w = StepWatchdog(1.0, rank=3, poll_s=0.1); w.beat('step 7'); time.sleep(30)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert out.returncode == EXIT_HUNG
    assert "rank 3 made no progress" in out.stderr and "in step 7" in out.stderr


def test_watchdog_stays_quiet_while_beating():
    code = (
        "import time; from dtrain.watchdog import StepWatchdog; w = StepWatchdog(1.0, rank=0, poll_s=0.1)\n"
        "for i in range(8):\n    w.beat(f'step {i}'); time.sleep(0.3)\nw.stop(); print('done')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and out.stdout.strip() == "done"


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "loss": {s}}}\n' for s in range(1, 9)) + '{"step": 4, "eval_loss": 1}\n')
    _drop_records_after(path, 5)
    assert [line for line in path.read_text().splitlines()] == [f'{{"step": {s}, "loss": {s}}}' for s in range(1, 6)] + [
        '{"step": 4, "eval_loss": 1}'
    ]


def test_fresh_start_moves_an_old_metrics_file_aside(tmp_path):
    from dtrain.config.schema import WandbConfig, WandbMode
    from dtrain.metrics import EvalRecord, MetricsLogger, read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "eval_loss": 9.0, "eval_tokens": 3}\n')
    logger = MetricsLogger(tmp_path, True, WandbConfig(mode=WandbMode.disabled), {}, "run")
    logger.log(EvalRecord(step=1, eval_loss=1.0, eval_tokens=3))
    logger.close()
    assert read_metrics(tmp_path).evals == [EvalRecord(1, 1.0, 3)]
    assert read_metrics(tmp_path / "metrics.previous.jsonl").evals == [EvalRecord(1, 9.0, 3)]

"""metrics.jsonl always; W&B offline on rank 0 only; TensorBoard when asked; a secret in the environment reaches no
run file; the records read back by attribute."""

import json

import pytest

from dtrain.config.schema import WandbConfig, WandbMode
from dtrain.metrics import EvalRecord, MetricsLogger, StepRecord, read_metrics, record_from_dict, wandb_mode


def step_record(step: int, loss: float, **changes) -> StepRecord:
    values = dict(
        step=step,
        epoch=0,
        loss=loss,
        lr=1e-3,
        grad_norm=0.5,
        tokens=10,
        input_tokens=20,
        tokens_seen=20 * step,
        tokens_per_s=100.0,
        input_tokens_per_s=200.0,
        padding_efficiency=0.8,
        step_time_s=0.1,
        samples_per_s=40.0,
        batch_fingerprint=123,
        tflops_per_gpu=0.01,
        mfu=None,
        time_data_s=0.0,
        time_forward_s=0.05,
    )
    return StepRecord(**{**values, **changes})


def test_jsonl_and_offline_wandb_without_secrets(tmp_path, monkeypatch):
    secret = "dtrain-test-secret-0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, True, WandbConfig(mode=WandbMode.offline, project="p", tags=["t"]), {"train": {"lr": 1.0}}, "run")
    logger.log(step_record(1, 2.5))
    logger.log(EvalRecord(step=1, eval_loss=2.0, eval_tokens=7))
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("loss") for line in lines] == [2.5, None] and lines[1] == {"step": 1, "eval_loss": 2.0, "eval_tokens": 7}
    assert "skipped" not in lines[0]  # only written when a step was skipped
    metrics = read_metrics(tmp_path)
    assert metrics.steps == [step_record(1, 2.5)] and metrics.evals == [EvalRecord(1, 2.0, 7)]
    wandb_files = list((tmp_path / "wandb").rglob("*"))
    assert any(p.suffix == ".wandb" for p in wandb_files)  # the offline run was written
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, False, WandbConfig(mode=WandbMode.offline), {}, "run", tensorboard=True)
    logger.log(step_record(1, 1.0))
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_records_from_older_files_read_with_missing_fields_as_none():
    record = record_from_dict({"step": 3, "loss": 1.5, "lr": 0.1, "tokens": 4, "some_future_key": 1})
    assert isinstance(record, StepRecord) and (record.step, record.loss, record.tokens) == (3, 1.5, 4)
    assert record.mfu is None and record.skipped is None
    assert record_from_dict({"note": "neither"}) is None


@pytest.mark.parametrize(
    "env, configured, expected",
    [
        (None, None, WandbMode.disabled),  # no account needed by default
        ("offline", None, WandbMode.offline),  # W&B's own variable decides when wandb.mode is unset
        ("dryrun", None, WandbMode.offline),
        ("online", WandbMode.disabled, WandbMode.disabled),  # an explicit wandb.mode wins
        ("disabled", WandbMode.online, WandbMode.online),
    ],
)
def test_wandb_mode_follows_the_environment_when_unset(monkeypatch, env, configured, expected):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert wandb_mode(configured) == expected


def test_wandb_offline_from_the_environment_alone_writes_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, True, WandbConfig(), {}, "run")  # wandb.mode left unset
    logger.log(step_record(1, 1.0))
    logger.close()
    assert any(p.suffix == ".wandb" for p in (tmp_path / "wandb").rglob("*"))


def test_tensorboard_gets_the_same_records(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, True, WandbConfig(mode=WandbMode.disabled), {}, "run", tensorboard=True)
    for step, loss in [(1, 3.0), (2, 2.5)]:
        logger.log(step_record(step, loss))
    logger.log(EvalRecord(step=2, eval_loss=2.25, eval_tokens=9))
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 3.0), (2, 2.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/eval_loss")] == [(2, 2.25)]
    assert "train/mfu" not in events.Tags()["scalars"]  # null values are not plotted

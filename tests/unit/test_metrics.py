"""metrics.jsonl always; W&B offline on rank 0 only; a secret in the environment reaches no run file."""

import json

from dtrain.config.schema import WandbConfig, WandbMode
from dtrain.metrics import MetricsLogger


def test_jsonl_and_offline_wandb_without_secrets(tmp_path, monkeypatch):
    secret = "dtrain-test-secret-0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, True, WandbConfig(mode=WandbMode.offline, project="p", tags=["t"]), {"train": {"lr": 1.0}}, "run")
    logger.log({"step": 1, "loss": 2.5})
    logger.log({"step": 1, "eval_loss": 2.0})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 2.5}, {"step": 1, "eval_loss": 2.0}]
    wandb_files = list((tmp_path / "wandb").rglob("*"))
    assert any(p.suffix == ".wandb" for p in wandb_files)  # the offline run was written
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, False, WandbConfig(mode=WandbMode.offline), {}, "run")
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []

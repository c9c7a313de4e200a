"""The resolution step: open choices decided once, from the data and the environment, and written as they ran."""

from omegaconf import OmegaConf

from dtrain.checkpoint import resume_key
from dtrain.config import compose_job, load_run_config
from dtrain.config.schema import WandbMode
from dtrain.resolve import resolve_job

MIXED = [20, 200, 35, 180, 60, 150, 90, 30] * 8
EVEN = [100] * 64


def test_packing_null_is_decided_from_the_data_and_recorded(tmp_path):
    job = compose_job(["+exp=tiny_cpu", "data.packing=null", "train.micro_batch_size=4"])
    resolved = resolve_job(job, MIXED, world_size=2)
    assert job.data.packing is None  # the composed job is left as it was
    assert resolved.job.data.packing is True and "packing on" in resolved.decisions[0]
    assert resolve_job(job, EVEN, world_size=2).job.data.packing is False
    (tmp_path / "config.yaml").write_text(resolved.config_yaml())
    assert load_run_config(tmp_path).data.packing is True
    assert OmegaConf.load(tmp_path / "config.yaml").data.packing is True


def test_the_resolved_job_resumes_with_the_value_that_ran():
    decided = resolve_job(compose_job(["+exp=tiny_cpu", "data.packing=null"]), MIXED, world_size=2).job
    explicit = resolve_job(compose_job(["+exp=tiny_cpu", "data.packing=true"]), MIXED, world_size=2).job
    assert resume_key(decided, 2) == resume_key(explicit, 2)
    padded = resolve_job(compose_job(["+exp=tiny_cpu", "data.packing=false"]), MIXED, world_size=2).job
    assert resume_key(decided, 2)["data.packing"] != resume_key(padded, 2)["data.packing"]


def test_batch_plan_and_wandb_mode_are_derived_once(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    resolved = resolve_job(compose_job(["+exp=tiny_cpu", "train.micro_batch_size=3", "train.grad_accum_steps=2"]), EVEN, world_size=4)
    assert resolved.batch.global_batch_size == 3 * 2 * 4
    assert resolved.job.wandb.mode == WandbMode.offline and any("WANDB_MODE" in d for d in resolved.decisions)
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_job(compose_job(["+exp=tiny_cpu"]), EVEN, 1).job.wandb.mode == WandbMode.disabled
    assert resolve_job(compose_job(["+exp=tiny_cpu", "wandb.mode=online"]), EVEN, 1).job.wandb.mode == WandbMode.online

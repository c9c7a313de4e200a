"""The generated DeepSpeed JSON for every zero x precision choice, against committed snapshots.

Regenerate the snapshots after an intended change with ``UPDATE_SNAPSHOTS=1 pytest tests/unit/test_ds_config.py``.
"""

import json
import os
from pathlib import Path

import pytest

from dtrain.config import compose_job
from dtrain.config.batch import BatchPlan
from dtrain.config.checks import check_job
from dtrain.config.schema import TrainConfig
from dtrain.ds_config import build_ds_config
from dtrain.errors import ConfigError

SNAPSHOTS = Path(__file__).parent / "snapshots" / "ds_config"
ZEROS = ["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"]
PRECISIONS = ["bf16", "fp16", "fp32"]


def _build(zero: str, precision: str, **kw) -> dict:
    job = compose_job(["+exp=7b_zero3", "data.path=/d.jsonl", f"zero={zero}", f"precision={precision}"])
    batch = BatchPlan.from_config(job.train, world_size=8)
    return build_ds_config(job, batch, hidden_size=4096, num_parameters=6_738_415_616, cuda_available=True, **kw)


@pytest.mark.parametrize("zero", ZEROS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_ds_config_snapshot(zero, precision):
    ds = _build(zero, precision)
    path = SNAPSHOTS / f"{zero}_{precision}.json"
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ds, indent=2, sort_keys=True) + "\n")
    assert ds == json.loads(path.read_text())
    assert "auto" not in json.dumps(ds)  # HF's run-time "auto" values have no meaning to DeepSpeed itself


@pytest.mark.parametrize("zero", ZEROS)
def test_stage_offload_and_precision_land_in_the_json(zero):
    ds = _build(zero, "bf16")
    z = ds["zero_optimization"]
    assert z["stage"] == int(zero[4])
    assert ("offload_optimizer" in z) == zero.endswith("offload")
    assert ("offload_param" in z) == (zero == "zero3_offload")
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    if zero.startswith("zero3"):  # sized from hidden_size=4096 as HF's "auto" would
        assert z["reduce_bucket_size"] == 4096 * 4096
        assert z["stage3_param_persistence_threshold"] == 40960


def test_fp16_keeps_dynamic_loss_scaling_and_fp32_has_no_half_section():
    fp16 = _build("zero2", "fp16")
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and "bf16" not in fp16
    fp32 = _build("zero2", "fp32")
    assert "fp16" not in fp32 and "bf16" not in fp32


@pytest.mark.parametrize("micro, accum, world", [(1, 1, 1), (4, 1, 2), (1, 8, 8), (3, 5, 7)])
def test_batch_sizes_come_from_one_plan(micro, accum, world):
    job = compose_job(["+exp=tiny_cpu", f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}"])
    batch = BatchPlan.from_config(job.train, world)
    ds = build_ds_config(job, batch)
    assert batch.global_batch_size == micro * accum * world
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        micro,
        accum,
        micro * accum * world,
    )


def test_zero_batch_is_refused():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        BatchPlan.from_config(TrainConfig(micro_batch_size=0), world_size=2)


def test_fp16_without_cuda_names_bf16():
    job = compose_job(["+exp=tiny_cpu", "precision=fp16"])
    with pytest.raises(ConfigError, match="precision=bf16"):
        check_job(job, cuda_available=False)


def test_parameter_offload_needs_zero3():
    job = compose_job(["+exp=tiny_cpu", "zero=zero2", "zero.offload_params=true"])
    with pytest.raises(ConfigError, match="ZeRO-3"):
        check_job(job, cuda_available=False)


def test_buckets_never_exceed_the_model():
    job = compose_job(["+exp=tiny_cpu", "zero=zero2"])
    ds = build_ds_config(job, BatchPlan.from_config(job.train, 2), num_parameters=1000)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["allgather_bucket_size"] == 1000

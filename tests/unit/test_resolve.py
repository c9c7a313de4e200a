"""The resolution step: open choices decided once, from the data and the environment, and written as they ran."""

import pytest
from omegaconf import OmegaConf

from dtrain.checkpoint import resume_key
from dtrain.config import compose_job, load_run_config
from dtrain.config.schema import Precision, WandbMode
from dtrain.resolve import CPU_FLAGS_ENV, MachineFacts, choose_precision, machine_facts, resolve_job

MIXED = [20, 200, 35, 180, 60, 150, 90, 30] * 8
EVEN = [100] * 64


def test_packing_null_is_decided_from_the_data_and_recorded(tmp_path):
    job = compose_job(["+exp=tiny_cpu", "data.packing=null", "train.micro_batch_size=4"])
    resolved = resolve_job(job, MIXED, world_size=2)
    assert job.data.packing is None  # the composed job is left as it was
    assert resolved.job.data.packing is True and any("packing on" in d for d in resolved.decisions)
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


@pytest.mark.parametrize(
    "machine, expected, why",
    [
        (MachineFacts(cuda_capability=(9, 0), gpu_name="NVIDIA H100 80GB HBM3"), Precision.bf16, "computes bf16 natively"),
        (MachineFacts(cuda_capability=(8, 0), gpu_name="NVIDIA A100-SXM4-80GB"), Precision.bf16, "compute capability 8.0"),
        (MachineFacts(cuda_capability=(7, 0), gpu_name="Tesla V100-SXM2-32GB"), Precision.fp16, "dynamic loss scaling"),
        (MachineFacts(cuda_capability=(7, 5), gpu_name="Tesla T4"), Precision.fp16, "no native bf16"),
        (MachineFacts(cpu_bf16="amx_bf16"), Precision.bf16, "(amx_bf16)"),
        (MachineFacts(cpu_bf16="avx512_bf16"), Precision.bf16, "(avx512_bf16)"),
        (MachineFacts(), Precision.fp32, "no AVX512-BF16 or AMX"),
    ],
)
def test_precision_auto_decision_table(machine, expected, why):
    precision, reason = choose_precision(machine)
    assert precision == expected and why in reason
    resolved = resolve_job(compose_job(["+exp=tiny_cpu", "precision=auto"]), EVEN, 1, machine)
    assert resolved.job.precision.name == expected
    assert any(d.startswith(f"precision=auto: {expected.value}") for d in resolved.decisions)
    # An explicit precision is kept whatever the machine.
    assert resolve_job(compose_job(["+exp=tiny_cpu", "precision=fp32"]), EVEN, 1, machine).job.precision.name == Precision.fp32


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu sse2 avx2 fma", None),  # an AVX2-only CPU: fp32
        ("fpu avx2 avx512f avx512bw", None),  # AVX-512 without its bf16 extension: fp32
        ("fpu avx2 avx512f avx512_bf16", "avx512_bf16"),
        ("fpu avx2 avx512_bf16 amx_bf16 amx_tile", "amx_bf16"),
    ],
)
def test_cpu_bf16_support_is_read_from_the_cpu_flags(tmp_path, monkeypatch, flags, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(CPU_FLAGS_ENV, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert machine_facts(cpuinfo) == MachineFacts(cpu_bf16=expected)
    assert machine_facts(tmp_path / "missing") == MachineFacts()  # not Linux: nothing known, fp32
    # The suite takes either branch of precision=auto on any CPU: the variable replaces the CPU's own flags.
    monkeypatch.setenv(CPU_FLAGS_ENV, flags)
    assert machine_facts(tmp_path / "missing") == MachineFacts(cpu_bf16=expected)
    monkeypatch.setenv(CPU_FLAGS_ENV, "none")
    assert machine_facts(cpuinfo) == MachineFacts()


def test_the_default_is_auto_and_the_exp_files_that_pin_a_precision_say_so():
    assert compose_job([]).precision.name == Precision.auto
    assert compose_job(["+exp=tiny_cpu"]).precision.name == Precision.auto  # the demo: fast on any CPU
    assert compose_job(["+exp=7b_zero3", "data.path=x"]).precision.name == Precision.bf16


def test_cpu_precision_bench_reports_both_dtypes_and_the_choice(tmp_path):
    """bench/cpu_precision.py in smoke mode, so it cannot rot: both dtypes measured, the choice that auto makes here."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    out = subprocess.run(
        [sys.executable, "bench/cpu_precision.py", "--smoke", "--json", str(tmp_path / "p.json")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["runs"][0]["fp32_gflops"] > 0 and result["runs"][0]["bf16_gflops"] > 0
    assert result["auto_precision"] == choose_precision(machine_facts())[0].value


def test_an_auto_format_resolves_to_what_was_detected_and_keys_the_checkpoint_like_it():
    from dtrain.checkpoint import resume_key
    from dtrain.config.schema import DataFormat

    job = compose_job(["+exp=tiny_cpu", "data.format=auto"])  # the bundled train.jsonl, and eval.jsonl as data.eval_path
    detected = {"train": "messages (detected)", "eval_path": "messages (detected)"}
    resolved = resolve_job(job, EVEN, 1, formats=detected)
    assert resolved.job.data.format == DataFormat.messages and job.data.format == DataFormat.auto  # the input is not changed
    assert any(d.startswith("data.format=auto: messages, detected from train") for d in resolved.decisions)
    # A checkpoint written when the bundled config still said data.format=messages resumes under auto.
    named = resolve_job(compose_job(["+exp=tiny_cpu", "data.format=messages"]), EVEN, 1, formats=detected).job
    assert resume_key(resolved.job, 1) == resume_key(named, 1)
    # An eval file of another shape than the training file: no single format to name, auto stays.
    mixed = {"train": "messages (detected)", "eval_path": "sharegpt (detected)"}
    assert resolve_job(job, EVEN, 1, formats=mixed).job.data.format == DataFormat.auto
    # In a mixture, each source without a format of its own gets its detected one; a named one is kept.
    sources = "data.sources=[{path: a.jsonl, name: a}, {path: b.jsonl, name: b, format: alpaca}]"
    mixture = compose_job(["+exp=tiny_cpu", "data.path=null", "data.format=auto", sources])
    got = resolve_job(mixture, EVEN, 1, formats={"a": "sharegpt (detected)", "b": "alpaca"}).job.data.sources
    assert [s.format for s in got] == [DataFormat.sharegpt, DataFormat.alpaca]

"""Every experiment composes against the schema; typos and wrong types fail at compose time with the key's name."""

import shutil
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from dtrain.config import JobConfig, compose_job
from dtrain.config.registry import CONF_DIR
from dtrain.config.schema import ModelInit, PeftMethod, Precision

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "exp").glob("*.yaml"))


def test_the_expected_experiments_exist():
    assert {"tiny_cpu", "7b_zero3", "7b_lora", "8b_zero3_offload"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes_and_validates(exp):
    job = compose_job([f"+exp={exp}", "data.path=/data/train.jsonl"])
    assert isinstance(job, JobConfig)
    assert job.run_name == exp
    assert job.output_dir == f"outputs/{exp}"  # one directory for all ranks, never clock-derived


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_file_opens_with_its_command(exp):
    lines = (CONF_DIR / "exp" / f"{exp}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"  # Hydra only honours the package directive as the first header line
    assert lines[1].startswith("# deepspeed ") and f"+exp={exp}" in lines[1]


def test_tiny_cpu_is_the_embedded_default():
    job = compose_job(["+exp=tiny_cpu"])
    assert Path(job.model.path, "config.json").is_file()
    assert job.model.init == ModelInit.random
    assert Path(job.data.path).is_file() and Path(job.data.eval_path).is_file()
    assert job.generate.before_training


def test_cli_contract_names():
    job = compose_job(
        [
            "+exp=tiny_cpu",
            "output_dir=/tmp/x",
            "model.path=/m",
            "data.path=/d.jsonl",
            "data.format=alpaca",
            "data.max_seq_len=128",
            "train.epochs=2",
            "train.max_steps=7",
            "train.micro_batch_size=3",
            "train.grad_accum_steps=5",
            "train.lr=1e-4",
            "train.seed=9",
            "zero=zero3_offload",
            "peft=lora",
            "precision=fp32",
        ]
    )
    assert (job.output_dir, job.model.path, job.data.path, job.data.format.value) == ("/tmp/x", "/m", "/d.jsonl", "alpaca")
    assert (job.data.max_seq_len, job.train.epochs, job.train.max_steps) == (128, 2, 7)
    assert (job.train.micro_batch_size, job.train.grad_accum_steps, job.train.lr, job.train.seed) == (3, 5, 1e-4, 9)
    assert (job.zero.stage, job.zero.offload_optimizer, job.zero.offload_params) == (3, True, True)
    assert job.peft.method == PeftMethod.lora and job.precision.name == Precision.fp32


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lrr=1", "train.lrr"),
        ("+train.lrr=1", "lrr"),
        ("train.lr=fast", "train.lr"),
        ("data.format=xml", "data.format"),
        ("zero=zero4", "zero"),
    ],
)
def test_bad_overrides_fail_with_the_key_name(override, key):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_job(["+exp=tiny_cpu", override])
    text = str(err.value) + str(err.value.__cause__ or "")
    assert key in text


def test_typo_inside_an_experiment_file_fails_with_the_key_name(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "exp" / "typo.yaml").write_text("# @package _global_\n# deepspeed launch/train.py +exp=typo\ntrain:\n  micro_batch_sise: 4\n")
    with pytest.raises(ConfigCompositionException) as err:
        compose_job(["+exp=typo"], conf_dir=conf)
    assert "micro_batch_sise" in str(err.value) + str(err.value.__cause__ or "")


@pytest.mark.parametrize("written, read", [("true", "across_steps"), ("false", "none"), ("within_step", "within_step")])
def test_run_configs_written_before_group_by_length_was_a_choice_still_load(tmp_path, written, read):
    import yaml
    from omegaconf import OmegaConf

    from dtrain.config import load_run_config

    config = yaml.safe_load(OmegaConf.to_yaml(OmegaConf.structured(compose_job(["+exp=tiny_cpu"]))))
    config["data"]["group_by_length"] = yaml.safe_load(written)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_run_config(tmp_path).data.group_by_length.value == read

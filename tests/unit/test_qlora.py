"""QLoRA and 8-bit AdamW on CPU in one process: config checks, 4-bit footprint, parameter counts, DS JSON."""

import importlib.util

import pytest
import torch

from dtrain.config import compose_job
from dtrain.config.batch import BatchPlan
from dtrain.config.checks import check_adamw_8bit, check_qlora
from dtrain.ds_config import build_ds_config
from dtrain.errors import ConfigError
from dtrain.model import (
    apply_lora,
    footprint_bytes,
    parameter_counts,
    prepare_for_kbit_training,
    quantization_config,
)

bnb = pytest.importorskip("bitsandbytes")


def qlora_job(*overrides):
    return compose_job(["+exp=tiny_cpu", "peft=qlora", "model.init=pretrained", *overrides])


@pytest.fixture(scope="module")
def quantised(tiny_pretrained):
    from transformers import AutoModelForCausalLM

    job = qlora_job(f"model.path={tiny_pretrained}")
    model = AutoModelForCausalLM.from_pretrained(
        tiny_pretrained, dtype=torch.bfloat16, quantization_config=quantization_config(job.peft, torch.bfloat16)
    )
    return job, model


def test_qlora_without_bitsandbytes_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ConfigError, match=r"pip install 'dtrain\[qlora\]'"):
        check_qlora(qlora_job())
    with pytest.raises(ConfigError, match=r"pip install 'dtrain\[qlora\]'"):
        check_adamw_8bit(compose_job(["+exp=tiny_cpu", "optim=adamw_8bit"]))


def test_unsupported_combinations_are_refused_before_loading():
    with pytest.raises(ConfigError, match="offload_params"):
        check_qlora(qlora_job("zero=zero3_offload"))
    with pytest.raises(ConfigError, match="own CPU Adam"):
        check_adamw_8bit(compose_job(["+exp=tiny_cpu", "optim=adamw_8bit", "zero=zero2_offload"]))
    check_qlora(qlora_job("zero=zero3"))
    check_qlora(qlora_job("zero=zero2_offload"))


def test_adamw_8bit_is_a_client_optimizer_in_the_ds_json():
    job = compose_job(["+exp=tiny_cpu", "optim=adamw_8bit"])
    ds = build_ds_config(job, BatchPlan.from_config(job.train, 2), hidden_size=128, num_parameters=10**6)
    assert "optimizer" not in ds and ds["zero_allow_untested_optimizer"] is True
    plain = compose_job(["+exp=tiny_cpu"])
    assert build_ds_config(plain, BatchPlan.from_config(plain.train, 2))["optimizer"]["type"] == "AdamW"


def test_four_bit_linear_weights_take_a_quarter_of_bf16(quantised, tiny_pretrained):
    from transformers import AutoModelForCausalLM

    job, model = quantised
    full = AutoModelForCausalLM.from_pretrained(tiny_pretrained, dtype=torch.bfloat16)
    linear_4bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(linear_4bit) == 4 * 7  # every linear layer of the 4 blocks; the head stays unquantised
    bytes_4bit = sum(m.weight.numel() * m.weight.element_size() for m in linear_4bit.values())
    bytes_bf16 = sum(full.get_submodule(n).weight.numel() * 2 for n in linear_4bit)
    assert bytes_4bit * 4 == bytes_bf16
    saved = bytes_bf16 - bytes_4bit
    assert footprint_bytes(full) - footprint_bytes(model) == saved


def test_trainable_share_matches_peft(quantised):
    from peft.peft_model import PeftModel

    job, model = quantised
    prepare_for_kbit_training(model, gradient_checkpointing=False)
    peft_model = apply_lora(model, job.peft)
    assert isinstance(peft_model, PeftModel)
    assert parameter_counts(peft_model) == peft_model.get_nb_trainable_parameters()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not m.support_avx512bf16_for_cpu for m in peft_model.modules() if isinstance(m, bnb.nn.Linear4bit))

"""Model-side choices that must hold without a GPU: attention fallback, LoRA targets, remote-code pinning."""

import importlib.util

import pytest
import torch

from dtrain.architectures import lora_targets
from dtrain.config.schema import ModelConfig
from dtrain.errors import ConfigError
from dtrain.model import (
    _remote_code_kwargs,
    choose_attn_implementation,
    count_parameters_from_config,
    load_tokenizer,
)

from tests.conftest import TINY_DIR


def test_sdpa_without_cuda_and_the_log_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    impl, reason = choose_attn_implementation("auto")
    assert impl == "sdpa" and "no CUDA" in reason


def test_flash_attention_when_cuda_and_flash_attn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else real_find_spec(name))
    assert choose_attn_implementation("auto")[0] == "flash_attention_2"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "flash_attn" else real_find_spec(name))
    impl, reason = choose_attn_implementation("auto")
    assert impl == "sdpa" and "dtrain[flash]" in reason


def test_explicit_attention_is_kept():
    assert choose_attn_implementation("eager")[0] == "eager"


def test_remote_code_needs_a_pinned_revision():
    with pytest.raises(ConfigError, match="model.revision"):
        _remote_code_kwargs(ModelConfig(path="x", trust_remote_code=True))
    assert _remote_code_kwargs(ModelConfig(path="x", trust_remote_code=True, revision="abc123")) == {
        "trust_remote_code": True,
        "revision": "abc123",
    }
    assert _remote_code_kwargs(ModelConfig(path="x")) == {"trust_remote_code": False}


def test_lora_targets_every_linear_but_the_head(tiny_pretrained):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pretrained)
    assert lora_targets(model).modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert count_parameters_from_config(model.config) == sum(p.numel() for p in model.parameters())


def test_tokenizer_does_not_warn_about_its_own_maximum_length(monkeypatch):
    """dtrain's length policy decides what is trained: the tokenizer's model_max_length warning is silenced."""
    from transformers import AutoTokenizer, tokenization_utils_base

    warnings = []
    monkeypatch.setattr(tokenization_utils_base.logger, "warning", lambda msg, *a, **k: warnings.append(str(msg)))
    tokenizer = load_tokenizer(ModelConfig(path=str(TINY_DIR)))
    tokenizer.model_max_length = 16
    assert len(tokenizer("a long conversation " * 20)["input_ids"]) > 16
    assert not [w for w in warnings if "longer than the specified maximum" in w]
    fresh = AutoTokenizer.from_pretrained(TINY_DIR)  # a tokenizer dtrain did not load still warns: the check can fail
    fresh.model_max_length = 16
    fresh("a long conversation " * 20)
    assert [w for w in warnings if "longer than the specified maximum" in w]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_loaded_pretrained_model_is_in_training_mode(tiny_pretrained, lora):
    """from_pretrained returns eval mode; dropout, gradient checkpointing and sequence-parallel attention need train mode."""
    from dtrain.config.schema import JobConfig, PeftMethod, Precision
    from dtrain.model import build_model

    job = JobConfig(output_dir="unused")
    job.model.path, job.precision.name, job.zero.stage = str(tiny_pretrained), Precision.fp32, 2
    if lora:
        job.peft.method = PeftMethod.lora
    model, _, mpu = build_model(job, {}, num_parameters=0)
    assert mpu is None  # no sequence parallelism
    assert model.training and all(m.training for m in model.modules())

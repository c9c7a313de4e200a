"""Seeded random weights depend on the seed and each module's name only (not on the RNG's history or the order)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dtrain.init_weights import init_weights_by_name, module_seed

from tests.conftest import TINY_DIR


def fresh_model(rng_seed: int):
    torch.manual_seed(rng_seed)  # a different global RNG state each time: from_config draws differently
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_DIR))


def test_same_seed_same_weights_whatever_the_rng_did_before():
    a, b = fresh_model(1), fresh_model(2)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    count = init_weights_by_name(a, seed=42, zero3=False, rank=0)
    init_weights_by_name(b, seed=42, zero3=False, rank=0)
    assert count == sum(p.numel() for p in a.parameters())
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    c = fresh_model(1)
    init_weights_by_name(c, seed=43, zero3=False, rank=0)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_each_module_draws_from_its_own_seed_with_the_models_init():
    model = fresh_model(0)
    init_weights_by_name(model, seed=7, zero3=False, rank=0)
    weight = model.model.layers[1].self_attn.q_proj.weight
    torch.manual_seed(module_seed(7, "model.layers.1.self_attn.q_proj"))
    expected = torch.empty_like(weight).normal_(0.0, model.config.initializer_range)
    assert torch.equal(weight, expected)
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))  # norms: ones, as transformers does
    assert weight.std().item() == pytest.approx(model.config.initializer_range, rel=0.05)

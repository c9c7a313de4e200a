"""Every popular family, tiny and random: packing computes what one-at-a-time computes, LoRA finds the right
targets (MoE experts adapted, routers frozen), the planner counts what the model holds, attention falls back."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dtrain.architectures import causal_lm_class, lora_targets, model_shape
from dtrain.config.schema import PeftConfig, PeftMethod
from dtrain.model import apply_lora, choose_attn_implementation, parameter_counts

from tests.architectures import FAMILIES, MOE, tiny_config


def build(family: str, seed: int = 0):
    config = tiny_config(family)
    attn, _ = choose_attn_implementation("auto", causal_lm_class(config))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_equal_one_at_a_time(family):
    """Two examples longer than the sliding window (8), packed with restarting position ids, no attention mask."""
    model = build(family)
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 256, (1, 13), generator=generator), torch.randint(0, 256, (1, 11), generator=generator)
    with torch.no_grad():
        alone = [model(input_ids=x, use_cache=False).logits[0] for x in (a, b)]
        position_ids = torch.cat([torch.arange(13), torch.arange(11)])[None]
        packed = model(input_ids=torch.cat([a, b], dim=1), position_ids=position_ids, use_cache=False).logits[0]
    torch.testing.assert_close(packed[:13], alone[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(packed[13:], alone[1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapts_every_linear_but_the_head_and_the_experts_not_the_router(family):
    model = build(family)
    targets = lora_targets(model)
    assert "lm_head" not in targets.modules and {"o_proj"} <= set(targets.modules)
    if family in MOE:
        assert targets.parameters == ["experts.down_proj", "experts.gate_up_proj"] and targets.frozen
    else:
        assert targets.parameters == [] and targets.frozen == []
    peft_model = apply_lora(model, PeftConfig(method=PeftMethod.lora, r=4, alpha=8, dropout=0.0))
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    if family in MOE:
        assert any(".experts." in n for n in trained)  # the experts are adapted...
        assert not any(r in n for n in trained for r in targets.frozen)  # ...the router is not
    # The planner's LoRA count (from the meta model) is what peft made.
    assert parameter_counts(peft_model)[0] == model_shape(tiny_config(family)).lora_parameters(4)


@pytest.mark.parametrize("family", FAMILIES)
def test_planner_counts_what_the_model_holds(family):
    model, shape = build(family), model_shape(tiny_config(family))
    assert shape.num_parameters == sum(p.numel() for p in model.parameters())
    experts = [p for n, p in model.named_parameters() if p.dim() == 3]
    if family in MOE:  # a token runs 2 of the 4 experts: half of the expert weights are not active
        assert shape.active_parameters == shape.num_parameters - sum(p.numel() for p in experts) // 2
    else:
        assert shape.active_parameters == shape.num_parameters


def test_attention_falls_back_where_a_family_has_no_sdpa():
    gemma2 = causal_lm_class(tiny_config("gemma2"))
    choice, reason = choose_attn_implementation("auto", gemma2)
    assert choice == "eager" and "Gemma2ForCausalLM has no sdpa attention" in reason
    assert choose_attn_implementation("auto", causal_lm_class(tiny_config("qwen3")))[0] == "sdpa"
    assert choose_attn_implementation("eager", causal_lm_class(tiny_config("qwen3")))[0] == "eager"  # as configured

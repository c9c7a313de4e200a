"""What differs between the model families people fine-tune, found from the model itself, never from a list of names.

    deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu model.path=/models/Qwen3-30B-A3B peft=lora zero=zero3

- LoRA targets: every linear layer except the output head, plus the fused expert weights of a mixture-of-experts
  model (3-D parameters in transformers 5, not linear modules: adapted through peft's ``target_parameters``). The
  router stays frozen. What is adapted and what is not is logged.
- Mixture-of-experts under ZeRO-3: the sparse block is a ZeRO-3 leaf module, gathered whole, so a rank whose tokens
  route to no expert still takes part in every gather (otherwise ranks wait on each other for ever).
- Attention: a model class that has no SDPA path (Gemma-2) falls back to eager attention, and the log says so.
- Sizes for the planner and MFU, counted on the meta device: LoRA parameters per rank from the real layer shapes
  (fused ``qkv_proj``/``gate_up_proj`` of Phi-3 included), and the parameters a token really uses in an MoE.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from dtrain.memory.plan import ModelShape

log = logging.getLogger("dtrain")


@dataclass(frozen=True)
class LoraTargets:
    modules: list[str]
    """Last name component of every adapted ``nn.Linear`` (peft ``target_modules``)."""
    parameters: list[str]
    """``<module>.<parameter>`` suffixes of adapted fused expert weights (peft ``target_parameters``)."""
    frozen: list[str]
    """Weight matrices left without an adapter on purpose (MoE routers), for the log."""


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Fused expert weights: parameters of three or more dimensions (experts x in x out)."""
    return [(name, p) for name, p in model.named_parameters() if len(getattr(p, "ds_shape", p.shape)) >= 3]


def lora_targets(model: nn.Module) -> LoraTargets:
    """Every linear layer but the output head, the fused expert weights, and the routers that stay frozen.

    bitsandbytes' ``Linear4bit`` subclasses ``nn.Linear``, so on a QLoRA base these are the quantised layers.
    """
    head = model.get_output_embeddings()
    modules = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head})
    parameters = sorted({".".join(name.split(".")[-2:]) for name, _ in expert_parameters(model)})
    frozen = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if parameters and not isinstance(m, nn.Linear) and any(word in type(m).__name__ for word in ("Router", "Gate"))
        }
    )
    return LoraTargets(modules, parameters, frozen)


def moe_block_classes(model: nn.Module) -> list[type]:
    """Classes of the modules that own the fused expert weights' parents (the sparse MoE blocks)."""
    parents = {name.rsplit(".", 2)[0] for name, _ in expert_parameters(model)}
    return sorted({type(m) for name, m in model.named_modules() if name in parents}, key=lambda c: c.__name__)


def mark_moe_blocks_as_zero3_leaves(model: nn.Module) -> list[str]:
    """ZeRO-3: gather each sparse MoE block whole (every rank joins every gather, whatever its tokens' routing)."""
    classes = moe_block_classes(model)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


def supports_attention(model_class: type, implementation: str) -> bool:
    """Whether transformers implements ``implementation`` for this model class."""
    flag = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}.get(implementation)
    return flag is None or bool(getattr(model_class, flag, True))


def causal_lm_class(config) -> type:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def model_shape(config) -> ModelShape:
    """The model's sizes, counted on the meta device (no memory, no weights): parameters, the LoRA parameters per
    rank of ``r`` for the targets above, and the parameters one token uses (MoE: only its ``num_experts_per_tok``)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    num_parameters = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    experts = [p for _, p in expert_parameters(model)]
    lora_dims = sum(m.in_features + m.out_features for m in linears) + sum(p.shape[0] * (p.shape[1] + p.shape[2]) for p in experts)
    adapted = sum(m.weight.numel() for m in linears) + sum(p.numel() for p in experts)
    active = num_parameters
    per_token = getattr(config, "num_experts_per_tok", None)
    if experts and per_token:
        active -= sum(p.numel() * (p.shape[0] - per_token) // p.shape[0] for p in experts)
    base = ModelShape.from_hf_config(config, num_parameters)
    return dataclasses.replace(base, lora_dims=lora_dims, adapted_weights=adapted, active_parameters=active)

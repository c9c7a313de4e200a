"""Tiny random configs of the model families people fine-tune (no hub): one place for the unit and launcher tests.

Each is 2 layers of width 64 over the bundled byte-level tokenizer (vocabulary 260, ChatML template), with the
family's own features switched on at a size the tests reach: sliding windows of 8 tokens (Mistral, Gemma-2/3),
logit soft-capping (Gemma-2), QK norms (Qwen3, Gemma-3), fused qkv/gate_up projections (Phi-3), 4 experts with 2
per token (Qwen3-MoE, Mixtral).
"""

from __future__ import annotations

from pathlib import Path

COMMON = dict(
    vocab_size=260,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=256,
    eos_token_id=258,
    pad_token_id=259,
    initializer_range=0.08,
)

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "qwen3_moe", "mixtral")
MOE = ("qwen3_moe", "mixtral")


def tiny_config(family: str):
    import transformers as t

    extra = {
        "llama": (t.LlamaConfig, {}),
        "qwen2": (t.Qwen2Config, {}),
        "qwen3": (t.Qwen3Config, {"head_dim": 16}),
        "mistral": (t.MistralConfig, {"sliding_window": 8}),
        "gemma2": (
            t.Gemma2Config,
            {
                "head_dim": 16,
                "sliding_window": 8,
                "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0,
                "query_pre_attn_scalar": 16,
            },
        ),
        "gemma3": (t.Gemma3TextConfig, {"head_dim": 16, "sliding_window": 8}),
        "phi3": (t.Phi3Config, {}),
        "qwen3_moe": (t.Qwen3MoeConfig, {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
        "mixtral": (t.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    }[family]
    return extra[0](**COMMON, **extra[1])


def save_tiny(family: str, folder: Path, seed: int = 1234) -> Path:
    """Config, fixed random weights (safetensors) and the bundled tokenizer: a stand-in for a hub checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import TINY_DIR

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_config(family)).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(TINY_DIR).save_pretrained(folder)
    return folder

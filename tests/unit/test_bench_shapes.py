"""The benchmark's random-weight model shapes: the published config plus a tokenizer whose ids fit it."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from common import shape_model  # noqa: E402


@pytest.mark.parametrize("shape, hidden, layers, billions", [("llama3_1b", 2048, 16, 1.24), ("llama3_3b", 3072, 28, 3.21)])
def test_shape_model_folder_loads_as_a_model_path(tmp_path, shape, hidden, layers, billions):
    from transformers import AutoConfig, AutoTokenizer

    from dtrain.model import count_parameters_from_config

    overrides = shape_model(shape, tmp_path / shape)
    assert overrides == [f"model.path={tmp_path / shape}", "model.init=random"]
    config = AutoConfig.from_pretrained(tmp_path / shape)
    assert (config.hidden_size, config.num_hidden_layers, config.tie_word_embeddings) == (hidden, layers, True)
    assert count_parameters_from_config(config) / 1e9 == pytest.approx(billions, abs=0.01)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / shape)
    assert tokenizer.chat_template and len(tokenizer) <= config.vocab_size


def test_unknown_shape_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--shape llama9: use one of"):
        shape_model("llama9", tmp_path)


def test_saved_random_weights_load_as_a_bf16_base_for_adapters(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "tiny"
    assert shape_model("tiny", folder, save_weights=True) == [f"model.path={folder}", "model.init=pretrained"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    weights = dict(model.named_parameters())
    assert all(torch.isfinite(w.float()).all() for w in weights.values())
    assert weights["model.layers.0.self_attn.q_proj.weight"].float().std() > 0  # initialised, not zeros

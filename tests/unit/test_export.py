"""Sharded safetensors export and its checks, on the bundled tiny model in one process."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dtrain.dist import DistInfo
from dtrain.export import (
    SAFE_INDEX,
    ExportError,
    check_logits,
    check_shapes,
    iter_full_parameters,
    parse_size,
    write_sharded_safetensors,
)

from tests.conftest import TINY_DIR

ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_DIR)).eval()


def export(model, out, max_bytes):
    out.mkdir()
    shapes = write_sharded_safetensors(iter_full_parameters(model, ONE_PROCESS, False), out, max_bytes, is_main=True)
    model.config.save_pretrained(out)
    return shapes


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("1024") == 1024
    assert parse_size("1.5kb") == 1500
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_sharded_export_round_trips_with_hf_index(tmp_path, tiny_model):
    out = tmp_path / "final"
    shapes = export(tiny_model, out, max_bytes=400_000)
    index = json.loads((out / SAFE_INDEX).read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards) and set(index["weight_map"]) == set(shapes)
    for shard in out.glob("model-*.safetensors"):  # no shard over the limit unless one tensor alone is bigger
        assert shard.stat().st_size < 400_000 + 128 * 1024 or len([n for n, f in index["weight_map"].items() if f == shard.name]) == 1
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    check_shapes(out, shapes)


def test_single_shard_export_is_model_safetensors(tmp_path, tiny_model):
    out = tmp_path / "final"
    export(tiny_model, out, max_bytes=10**9)
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"] and not (out / SAFE_INDEX).exists()


def test_check_shapes_and_logits_catch_a_wrong_export(tmp_path, tiny_model):
    out = tmp_path / "final"
    shapes = export(tiny_model, out, max_bytes=10**9)
    with pytest.raises(ExportError, match="missing"):
        check_shapes(out, {**shapes, "lm_head.extra": (1,)})
    with pytest.raises(ExportError, match="wrong shape"):
        check_shapes(out, {**shapes, "lm_head.weight": (1, 2)})
    ids = torch.tensor([[5, 6, 7, 8]])
    probe = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits": tiny_model(ids).logits.detach()}
    assert check_logits(lambda: AutoModelForCausalLM.from_pretrained(out), probe, torch.float32) == 0.0
    probe["logits"] = probe["logits"] + 1e-2
    with pytest.raises(ExportError, match="logits differ"):
        check_logits(lambda: AutoModelForCausalLM.from_pretrained(out), probe, torch.float32)

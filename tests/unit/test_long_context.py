"""Tiled MLP: the same loss and gradients as the plain MLP, with exactly the agreed number of tiles on every rank."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dtrain.config import asset_path
from dtrain.config.checks import check_job
from dtrain.config.registry import compose_job
from dtrain.errors import ConfigError
from dtrain.long_context import TileCount, install_tiled_mlp


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(asset_path("tiny"))
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).float().train()


def assert_same_gradient(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal up to fp32 summation order, on any CPU: tiling sums a gradient's terms in another order, and each CPU's
    kernels choose their own order, so the bound is relative to the tensor's largest element, not to each element
    (an element near zero is a cancellation: on an AVX2-only EPYC the embedding's failed rtol=1e-5, atol=1e-7 per
    element while the largest difference of any tensor was 1.7e-6 of its largest element)."""
    scale = want.abs().max().item()
    assert scale > 0, name  # a gradient that is all zero would prove nothing
    assert (got - want).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("width, tile_tokens", [(37, 8), (40, 8), (5, 2)])
def test_tiled_mlp_gives_the_same_loss_and_gradients(width, tile_tokens):
    plain, tiled = tiny_model(), tiny_model()
    count = TileCount(tile_tokens, reduce_max=lambda n: n)
    assert install_tiled_mlp(tiled, count) == plain.config.num_hidden_layers
    ids = torch.randint(0, plain.config.vocab_size, (2, width))
    calls = []
    mlp = tiled.model.layers[0].mlp
    mlp.gate_proj.register_forward_hook(lambda *_: calls.append(1))
    count.agree(width)
    losses = [m(input_ids=ids, labels=ids, use_cache=False).loss for m in (plain, tiled)]
    for loss in losses:
        loss.backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), tiled.named_parameters()):
        assert_same_gradient(b.grad, a.grad, name)
    # Exactly `tiles` tiles in forward and again in backward's recompute, even when the rows do not divide.
    assert count.tiles == -(-width // tile_tokens) and len(calls) == 2 * count.tiles


def test_the_tile_count_is_the_largest_over_the_ranks_and_eval_runs_whole():
    count = TileCount(16, reduce_max=lambda n: max(n, 100))  # another rank holds 100 tokens per row
    assert count.agree(20) == 7
    model = tiny_model()
    install_tiled_mlp(model, count)
    calls = []
    model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda *_: calls.append(1))
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, 20)), use_cache=False)
    assert len(calls) == 1


def test_activation_offload_needs_recomputation():
    job = compose_job(["+exp=tiny_cpu", "model.activation_offload=true"])
    with pytest.raises(ConfigError, match="add model.gradient_checkpointing=true"):
        check_job(job, cuda_available=False)

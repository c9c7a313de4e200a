"""Long sequences on one GPU: tiled MLP and activation-checkpoint offload (two pieces of DeepSpeed's ALST stack).

- **Tiled MLP** (``model.tiled_mlp=true``): each decoder layer's MLP runs over the sequence in tiles with
  DeepSpeed's ``TiledMLP``, which saves only the MLP's input and recomputes each tile in backward, so the
  ``4 x intermediate`` activations per token are never held for the whole sequence (they dominate at long
  sequence lengths: 14336 per token for Llama-3-8B against 4096 for the rest of the layer's input). Every rank
  must cut the same number of tiles: under ZeRO-3 each tile's recompute gathers the MLP's weights, and a rank
  that ran fewer gathers would leave the others waiting. The count is agreed once per micro-batch (one
  all-reduce of the longest local sequence), not once per layer.
- **Activation offload** (``model.activation_offload=true``, needs ``model.gradient_checkpointing=true``): the
  inputs that gradient checkpointing saves per layer go to host memory during forward and come back for
  backward (DeepSpeed's ``CheckpointHiddenStatesOffload``; pinned buffers and a side stream on CUDA), so the
  GPU keeps the last layer's only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import types
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("dtrain")


class TileCount:
    """The number of tiles every MLP cuts in the current micro-batch: agreed by all ranks before its forward."""

    def __init__(self, tile_tokens: int, reduce_max: Callable[[int], int]):
        """
        Args:
            tile_tokens: Tokens per row in a tile (DeepSpeed's choice, the default: the hidden size, so that a tile's
                ``intermediate``-wide activations are about the size of one weight matrix).
            reduce_max: The maximum of an int over all ranks (a collective; every rank calls it).
        """
        self.tile_tokens = tile_tokens
        self.reduce_max = reduce_max
        self.tiles = 1

    def agree(self, local_tokens: int) -> int:
        """Set the tile count from this rank's tokens per row (a collective: every rank calls it)."""
        self.tiles = max(1, math.ceil(self.reduce_max(local_tokens) / self.tile_tokens))
        return self.tiles


def _is_dense_mlp(module: nn.Module) -> bool:
    # Mixture-of-experts blocks route tokens with a load-balancing loss over the whole batch: not tiled.
    name = type(module).__name__
    return name.endswith("MLP") and not any(word in name for word in ("Moe", "MoE", "Sparse"))


def install_tiled_mlp(model: nn.Module, count: TileCount) -> int:
    """Replace the forward of every dense decoder MLP of ``model`` by a tiled one (before ``deepspeed.initialize``).

    Returns:
        How many MLPs were tiled (0: the model has none this recognises; the caller says so).
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    tiled = 0
    for module in model.modules():
        if not _is_dense_mlp(module) or hasattr(module, "_dtrain_untiled_forward"):
            continue
        module._dtrain_untiled_forward = module.forward

        def tiled_forward(self, x: torch.Tensor) -> torch.Tensor:
            # Only training saves activations worth tiling; eval and generation (different prompt lengths per rank
            # under ZeRO-3) run whole, the same on every rank.
            if not self.training or count.tiles <= 1:
                return self._dtrain_untiled_forward(x)
            # Exactly `tiles` tiles on every rank, whatever its rows' length: padded to a multiple of the count
            # (torch.chunk makes fewer pieces otherwise). Zero rows add nothing to the weights' gradients.
            tokens = x.shape[-2]
            extra = -tokens % count.tiles
            padded = F.pad(x, (0, 0, 0, extra)) if extra else x
            params = list(self.parameters())
            out = TiledMLP.apply(lambda mlp, tile: mlp._dtrain_untiled_forward(tile), self, padded, count.tiles, params)
            return out[..., :tokens, :] if extra else out

        module.forward = types.MethodType(tiled_forward, module)
        tiled += 1
    return tiled


def activation_offload(on_cuda: bool) -> ContextManager[Any]:
    """The context under which a forward's checkpointed layer inputs are offloaded to host memory."""
    from deepspeed.runtime.activation_checkpointing.offload_activations import get_checkpoint_hidden_states_offloading_ctx_manager

    return get_checkpoint_hidden_states_offloading_ctx_manager(use_pin_memory=on_cuda, use_streams=on_cuda)


def no_offload() -> ContextManager[Any]:
    return contextlib.nullcontext()

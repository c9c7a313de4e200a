"""The model side of a run: its shape from the config, the DeepSpeed engine, and the loss of a batch on it.

    deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu     # builds all of this on every rank

``build_engine`` loads the model (partitioned while loading under ZeRO-3), installs the chunked loss head when
configured, and hands model, optimizer and schedule to ``deepspeed.initialize``. :class:`BatchLoss` is the one
forward the trainer, eval, the export probe and the activation meter share.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch

from dtrain.architectures import causal_lm_class, model_shape
from dtrain.chunked_loss import ChunkedLossHead, install_chunked_loss_head, liger_available
from dtrain.config.schema import JobConfig
from dtrain.data.dataset import PreparedData
from dtrain.dist import all_reduce_max
from dtrain.errors import ConfigError, DataError
from dtrain.long_context import TileCount, activation_offload, install_tiled_mlp, no_offload
from dtrain.loss import group_loss_sums, token_loss_sum
from dtrain.memory.plan import ModelShape
from dtrain.model import build_model, choose_attn_implementation, parameter_counts
from dtrain.optim import build_client_optimizer, build_scheduler, parameter_groups
from dtrain.sequence_parallel import check_model, gradient_divisor

log = logging.getLogger("dtrain")

DEEPSPEED_MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


class NeverBuiltMuon:
    """What every name of DeepSpeed's Muon modules is in a dtrain rank. DeepSpeed's ZeRO code imports them on
    every path, to ask whether the optimizer is Muon (``isinstance``) and to have ``muon_update`` at hand for
    parameters Muon owns; a dtrain optimizer never is Muon and owns no parameter that way."""

    def __init__(self, *args, **kwargs):
        raise ConfigError("DeepSpeed's Muon optimizer is not available through dtrain: set optim.name=adamw or optim.name=adamw_8bit")


@functools.cache
def _never_built(name: str) -> type:
    if name.startswith("__"):  # the import machinery's probes (__path__, __spec__ ...) must not find a stand-in
        raise AttributeError(name)
    return type(name, (NeverBuiltMuon,), {"__module__": "dtrain.engine"})


def stand_in_for_deepspeed_muon() -> bool:
    """Make DeepSpeed's Muon modules stand-ins for this process, unless the real ones are already imported.

    Importing them applies ``torch.compile`` to Muon's kernels, which loads inductor: 1.2-1.4 s of every rank's
    start-up on a 2-core CPU (docs/BENCHMARKS.md), for an optimizer no dtrain run builds: dtrain writes the
    DeepSpeed JSON, whose optimizer is always AdamW, or hands DeepSpeed an 8-bit AdamW.

    ``DTRAIN_REAL_DEEPSPEED_MUON=1`` keeps DeepSpeed's own modules (``bench/startup.py`` compares the two).

    Returns:
        True when the stand-ins were installed; False when a real module was already loaded or the variable asks
        for the real ones (then they load as DeepSpeed wants).
    """
    if os.environ.get("DTRAIN_REAL_DEEPSPEED_MUON") == "1" or any(name in sys.modules for name in DEEPSPEED_MUON_MODULES):
        return False
    for name in DEEPSPEED_MUON_MODULES:
        module = types.ModuleType(name, "dtrain's stand-in: no dtrain optimizer is Muon (dtrain.engine)")
        module.__getattr__ = _never_built
        sys.modules[name] = module
    return True


def read_model_shape(job: JobConfig, data: PreparedData) -> ModelShape:
    """The model's size and shape from its ``config.json``; the data's token ids are checked against its vocabulary,
    and its attention heads and kernel against ``parallel.sp_size``.

    Raises:
        DataError: A token id the embedding does not have (the tokenizer belongs to another model).
        ConfigError: Attention heads or kernel that sequence parallelism cannot split (before any weight is loaded).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(job.model.path, trust_remote_code=job.model.trust_remote_code, revision=job.model.revision)
    biggest = data.max_token_id
    if biggest >= config.vocab_size:
        raise DataError(
            f"token id {biggest} does not fit the model's {config.vocab_size} embedding rows: the tokenizer at "
            f"{job.model.path} does not belong to this model (or added tokens need resize_token_embeddings)"
        )
    check_model(config, job.parallel.sp_size, choose_attn_implementation(job.model.attn_implementation, causal_lm_class(config))[0])
    return model_shape(config)


class BatchLoss:
    """Logits and summed token loss of a collated batch on the engine (each call a collective under ZeRO-3).

    A batch that carries ``source_ids`` (a mixture of several sources) also leaves the detached loss sum of each
    source in ``source_sums``. ``offload()`` is the context a training micro-batch's forward and backward run in
    (activation offload; a no-op without it).
    """

    def __init__(
        self,
        engine,
        device: torch.device,
        loss_head: Optional[ChunkedLossHead],
        num_sources: int = 1,
        tiles: Optional[TileCount] = None,
        offload: Callable[[], ContextManager[Any]] = no_offload,
    ):
        self.engine = engine
        self.device = device
        self.loss_head = loss_head
        self.num_sources = num_sources
        self.source_sums: Optional[torch.Tensor] = None
        self.tiles = tiles
        self.offload = offload

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the engine on one collated batch."""
        # use_cache=False matters beyond memory: with a cache, transformers ignores packed position_ids and
        # packed examples would attend to each other.
        # non_blocking: a pinned batch is copied while the GPU is still busy; the kernels that read it wait for it.
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        if self.tiles is not None:
            # Sync point: every rank must cut its MLPs into the same number of tiles (each tile gathers weights).
            self.tiles.agree(inputs["input_ids"].shape[1])
        return self.engine(**inputs, use_cache=False).logits

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of next-token cross-entropies over the batch's trained tokens (no host sync).

        The batch's ``targets`` were shifted by the loader (``dtrain.loss.shift_labels``); nothing shifts them here.
        ``target_sources`` (a mixture) is shifted with them.
        """
        targets = batch["targets"].to(self.device, non_blocking=True)
        groups = batch.get("target_sources")
        self.source_sums = None
        if groups is not None:
            groups = groups.to(self.device, non_blocking=True)
        if self.loss_head is None and groups is None:
            return token_loss_sum(self.forward(batch), targets)
        if self.loss_head is None:
            loss_sum, self.source_sums = group_loss_sums(self.forward(batch), targets, groups, self.num_sources)
            return loss_sum
        # Consumed by the head in this forward; without targets it returns logits.
        self.loss_head.targets, self.loss_head.groups = targets, groups
        self.loss_head.group_sums = None if groups is None else torch.zeros(self.num_sources, dtype=torch.float32, device=self.device)
        loss_sum = self.forward(batch)
        self.source_sums = self.loss_head.group_sums
        return loss_sum


@dataclass
class EngineParts:
    engine: Any
    scheduler: Any
    loss: BatchLoss
    trainable_weights: Optional[int]
    """Trained parameters when adapters freeze the rest (MFU counts frozen weights at 4 FLOPs, not 6), else None."""
    hf_ds_config: Any
    """Keep referenced for the life of the model: transformers holds it weakly (ZeRO-3 saving and generation)."""
    gradient_divisor: int
    """What DeepSpeed divides the gradients summed over all ranks by (``dtrain.sequence_parallel.gradient_divisor``)."""


def build_engine(
    job: JobConfig, ds_config: dict[str, Any], shape: ModelShape, total_steps: int, device: torch.device, num_sources: int = 1
) -> EngineParts:
    """Load the model and start the DeepSpeed engine (a collective: every rank calls it)."""
    import deepspeed

    model, hf_ds_config, mpu = build_model(job, ds_config, shape.num_parameters)
    # Before deepspeed.initialize: ZeRO-3 hooks the modules present then, and the head must gather its weight.
    loss_head = install_chunked_loss_head(model, job.train.loss_chunk_size) if job.train.loss_chunk_size else None
    tiles = install_long_context(model, job, shape, device)
    if loss_head is not None:
        log.info(
            "loss: computed from the hidden states %d trained tokens at a time (%s); no [tokens, vocab] logits",
            job.train.loss_chunk_size,
            "Liger's fused kernel" if liger_available() else "dtrain.chunked_loss",
        )
    trainable_weights = parameter_counts(model)[0] if job.peft.uses_adapters else None
    groups = parameter_groups(model, job.train.weight_decay)
    stand_in_for_deepspeed_muon()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=build_client_optimizer(groups, job.train, job.optim),
        config=ds_config,
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, job.train, total_steps),
        mpu=mpu,
    )
    offload = (lambda: activation_offload(torch.cuda.is_available())) if job.model.activation_offload else no_offload
    loss = BatchLoss(engine, device, loss_head, num_sources, tiles, offload)
    divisor = gradient_divisor(job.zero.stage, torch.distributed.get_world_size(), job.parallel.sp_size)
    return EngineParts(engine, scheduler, loss, trainable_weights, hf_ds_config, divisor)


def install_long_context(model, job: JobConfig, shape: ModelShape, device: torch.device) -> Optional[TileCount]:
    """Tile the MLPs (``model.tiled_mlp``; before ``deepspeed.initialize``) and say what activation offload does."""
    tiles = None
    if job.model.tiled_mlp:
        tile = job.model.tiled_mlp_tokens or shape.hidden
        tiles = TileCount(tile, lambda n: all_reduce_max(n, device))
        count = install_tiled_mlp(model, tiles)
        if count == 0:
            raise ConfigError(f"model.tiled_mlp=true: {type(model).__name__} has no dense MLP module (*MLP) to tile")
        log.info("tiled MLP: %d MLPs run in tiles of about %d tokens per row, recomputed in backward", count, tile)
    if job.model.activation_offload:
        log.info("activation offload: the checkpointed layer inputs wait in host memory between forward and backward")
    return tiles

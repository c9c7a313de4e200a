"""Throughput: FLOPs of a training step, model FLOPs utilisation (MFU), and where a step's time goes.

Per token, a decoder's matmuls cost 2 FLOPs per weight forward and 4 backward (input and weight gradients):
6 x N with N the non-embedding parameters (the input embedding is a lookup; the output head is a matmul and
counts); a mixture of experts counts the experts a token runs, not all of them. Attention adds
12 x layers x heads x head_dim x (the example's own length) per token, so a padded or packed row is priced by its
examples, not by the row width. A frozen weight (LoRA, QLoRA) skips its weight
gradient: 4 FLOPs per token instead of 6.
"""

from __future__ import annotations

from typing import Optional

from dtrain.memory.plan import ModelShape

PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "L40S": 362.0, "A10G": 125.0}
"""Dense bf16/fp16 tensor-core peaks (TFLOP/s) by GPU name; fp32 runs use TF32 at half of these."""


def step_flops(shape: ModelShape, real_tokens: int, sum_sq_lengths: int, trainable_weights: Optional[int] = None) -> float:
    """Model FLOPs of one optimizer step over ``real_tokens`` non-pad tokens.

    Args:
        sum_sq_lengths: The sum over the step's examples of length squared (attention is per example).
        trainable_weights: Weights that get a weight gradient; None means all (full fine-tuning).
    """
    n = (shape.active_parameters or shape.num_parameters) - shape.vocab * shape.hidden
    if trainable_weights is None:
        dense = 6 * n
    else:
        dense = 4 * n + 2 * trainable_weights
    attention = 12 * shape.layers * shape.heads * shape.head_dim * sum_sq_lengths
    return dense * real_tokens + attention


def peak_flops(device_name: Optional[str], fp32: bool, override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of one GPU, from the config override or by name (None when unknown, e.g. on CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    name = device_name.upper()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12 / (2 if fp32 else 1)
    return None


def mfu(flops: float, seconds: float, world_size: int, peak: Optional[float]) -> Optional[float]:
    if not peak or seconds <= 0:
        return None
    return flops / (seconds * world_size * peak)


class PhaseTimer:
    """Wall time per phase of a step (data, forward, backward, optimizer), accumulated over micro-batches.

    On a GPU each phase boundary has to synchronise the device (kernels run asynchronously, so without it the
    time lands in whichever phase next waits). Those syncs stall the CPU's kernel queueing, so the trainer asks
    for them only on logged steps (``synchronize``); other GPU steps report no per-phase split (``reliable``).
    """

    PHASES = ("data", "forward", "backward", "optimizer")

    def __init__(self, device, synchronize: bool = True):
        import torch

        on_gpu = device.type == "cuda"
        self._sync = torch.cuda.synchronize if on_gpu and synchronize else (lambda: None)
        self.reliable = synchronize or not on_gpu
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    def __call__(self, phase: str) -> PhaseTimer:
        self._phase = phase
        return self

    def __enter__(self) -> None:
        import time

        self._sync()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        import time

        self._sync()
        self.seconds[self._phase] += time.perf_counter() - self._t0

"""FLOP counting and MFU against hand-computed numbers."""

import pytest

from dtrain.memory.plan import ModelShape
from dtrain.throughput import mfu, peak_flops, step_flops

# 2 layers, hidden 8, 2 heads of 4, vocab 10: 1000 parameters of which 80 are the input embedding.
SHAPE = ModelShape(num_parameters=1000, hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, head_dim=4, vocab=10)


def test_step_flops_by_hand():
    # Two examples of 3 and 5 tokens: dense 6 * 920 * 8 = 44160; attention 12 * 2 * 2 * 4 * (9 + 25) = 6528.
    assert step_flops(SHAPE, real_tokens=8, sum_sq_lengths=9 + 25) == 44160 + 6528
    # LoRA with 40 trained weights: (4 * 920 + 2 * 40) * 8 = 30080 dense.
    assert step_flops(SHAPE, 8, 34, trainable_weights=40) == 30080 + 6528


def test_mfu_and_peaks():
    assert peak_flops("NVIDIA H100 80GB HBM3", fp32=False) == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", fp32=True) == 156e12
    assert peak_flops("cpu", fp32=False) is None and peak_flops(None, False, override_tflops=100) == 1e14
    assert mfu(989e12 * 8 * 0.5, seconds=1.0, world_size=8, peak=989e12) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, 1, None) is None

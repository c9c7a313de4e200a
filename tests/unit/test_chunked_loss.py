"""Chunked cross-entropy equals the plain logits path, in loss and in gradients, and its head is a drop-in lm_head.

Tolerances (float32): the loss sums ~40 terms to ~200, so it is compared relatively (rtol 1e-6, about 8 float32
ulps); gradients of the loss function are O(1) per element and compared absolutely (atol 1e-6). Both paths are
also checked against a float64 reference within the same bounds, so neither merely agrees with the other's
rounding. Through the tiny Llama the gradients reach ~15 and pass four layers of backward, where the plain float32
path itself sits 2e-6 (of each gradient's largest entry) from float64: there the bound is 2e-6 of that scale.
bf16 inputs must be no further from float64 than the plain bf16 path is (or one bf16 rounding of the largest entry).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from dtrain import chunked_loss
from dtrain.chunked_loss import (
    ChunkedLossHead,
    chunked_token_loss_sum,
    install_chunked_loss_head,
    liger_available,
    plain_lm_head,
    uninstall_chunked_loss_head,
)
from dtrain.data import IGNORE_INDEX
from dtrain.loss import shift_labels, shifted_token_loss_sum

from tests.conftest import REPO_ROOT, TINY_DIR

LOSS_RTOL, GRAD_ATOL = 1e-6, 1e-6
B, S, H, V = 3, 17, 32, 101  # 48 shifted positions


def _inputs(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g).to(dtype)
    weight = (0.3 * torch.randn(V, H, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    return hidden, weight, labels


def _scattered(labels: torch.Tensor) -> torch.Tensor:
    """Ignored labels scattered, plus a run long enough (row 0's first 12 targets) to fill whole chunks."""
    labels = labels.clone()
    labels[0, :13] = IGNORE_INDEX
    labels[1, ::3] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    return labels


def _loss_and_grads(fn, hidden, weight, scale: float = 0.37):
    """Loss and the gradients of ``scale * loss`` (a non-unit incoming gradient, as the trainer's normaliser is)."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def _float64_reference(hidden, weight, labels):
    def fn(h, w):
        logits = h.double() @ w.double().T
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")

    return _loss_and_grads(fn, hidden, weight)


def _assert_matches(got, want):
    (loss, grad_h, grad_w), (ref_loss, ref_h, ref_w) = got, want
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=LOSS_RTOL, atol=0.0)
    torch.testing.assert_close(grad_h.double(), ref_h.double(), rtol=0.0, atol=GRAD_ATOL)
    torch.testing.assert_close(grad_w.double(), ref_w.double(), rtol=0.0, atol=GRAD_ATOL)


@pytest.mark.parametrize("masked", [False, True], ids=["all-trained", "scattered-ignored"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 10_000])
def test_equals_plain_loss_and_gradients(chunk_size, masked):
    hidden, weight, labels = _inputs()
    if masked:
        labels = _scattered(labels)
    plain = _loss_and_grads(lambda h, w: shifted_token_loss_sum(h @ w.T, labels), hidden, weight)
    chunked = _loss_and_grads(lambda h, w: chunked_token_loss_sum(h, w, shift_labels(labels), chunk_size), hidden, weight)
    reference = _float64_reference(hidden, weight, labels)
    assert chunked[0].dtype == torch.float32 and chunked[1].dtype == chunked[2].dtype == torch.float32
    _assert_matches(chunked, plain)
    _assert_matches(chunked, reference)
    _assert_matches(plain, reference)


def test_chunk_over_fully_ignored_positions_is_skipped(monkeypatch):
    hidden, weight, labels = _inputs(1)
    labels = _scattered(labels)
    calls = []
    real_linear = F.linear

    def counting_linear(x, w, b=None):
        calls.append(x.shape[0])
        return real_linear(x, w, b)

    trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
    monkeypatch.setattr(chunked_loss.F, "linear", counting_linear)
    chunked = _loss_and_grads(lambda h, w: chunked_token_loss_sum(h, w, shift_labels(labels), 4), hidden, weight)
    monkeypatch.undo()
    # Only trained rows are multiplied: the 12 ignored targets of row 0 (three chunks of 4) cost nothing.
    assert sum(calls) == trained and len(calls) == -(-trained // 4)
    _assert_matches(chunked, _float64_reference(hidden, weight, labels))


def test_fully_ignored_batch_gives_exact_zero_and_zero_gradients():
    hidden, weight, _ = _inputs(2)
    labels = torch.full((B, S), IGNORE_INDEX)
    loss, grad_h, grad_w = _loss_and_grads(lambda h, w: chunked_token_loss_sum(h, w, shift_labels(labels), 8), hidden, weight)
    # Backward ran (the grads exist, so the parameters' hooks fired) and produced exact zeros.
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert grad_h is not None and grad_w is not None
    assert torch.count_nonzero(grad_h) == 0 and torch.count_nonzero(grad_w) == 0


@pytest.mark.parametrize("chunk_size", [5, 1000], ids=["float32-sum-over-chunks", "one-chunk"])
def test_bf16_inputs_match_the_plain_bf16_path(monkeypatch, chunk_size):
    monkeypatch.setattr(chunked_loss, "_WEIGHT_GRAD_SLICE", 16)  # several vocabulary slices, the last one short
    hidden, weight, labels = _inputs(3, torch.bfloat16)
    labels = _scattered(labels)
    plain = _loss_and_grads(lambda h, w: shifted_token_loss_sum(h @ w.T, labels), hidden, weight)
    chunked = _loss_and_grads(lambda h, w: chunked_token_loss_sum(h, w, shift_labels(labels), chunk_size), hidden, weight)
    reference = _float64_reference(hidden, weight, labels)
    loss, grad_h, grad_w = chunked
    assert loss.dtype == torch.float32 and grad_h.dtype == grad_w.dtype == torch.bfloat16
    # The same bf16 logits matmul upcast to float32 as the plain path, so the same loss.
    torch.testing.assert_close(loss, plain[0], rtol=LOSS_RTOL, atol=0.0)
    # The gradients round to bf16 at other points (per chunk); their error must stay that of the plain path,
    # allowing one bf16 rounding (2^-8 relative) of the largest entry.
    for got, base, ref in zip(chunked[1:], plain[1:], reference[1:]):
        error, base_error = (got.double() - ref).abs().max(), (base.double() - ref).abs().max()
        assert error <= max(base_error, 2**-8 * ref.abs().max()), (error, base_error)


def test_tied_weight_gradients_add_through_autograd():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = _scattered(torch.randint(0, V, (B, S), generator=g))
    proj = torch.randn(H, H, generator=g) / H**0.5

    def run(loss_fn):
        embed = (0.3 * torch.randn(V, H, generator=torch.Generator().manual_seed(5))).requires_grad_()
        hidden = torch.tanh(F.embedding(ids, embed) @ proj)  # the same Parameter feeds input and output
        loss = loss_fn(hidden, embed)
        loss.backward()
        return loss.detach(), embed.grad

    plain_loss, plain_grad = run(lambda h, w: shifted_token_loss_sum(h @ w.T, labels))
    chunked_loss_, chunked_grad = run(lambda h, w: chunked_token_loss_sum(h, w, shift_labels(labels), 6))
    torch.testing.assert_close(chunked_loss_, plain_loss, rtol=LOSS_RTOL, atol=0.0)
    torch.testing.assert_close(chunked_grad, plain_grad, rtol=0.0, atol=GRAD_ATOL)


def test_no_grad_and_frozen_weight():
    hidden, weight, labels = _inputs(6)
    want = shifted_token_loss_sum(hidden @ weight.T, labels)
    with torch.no_grad():
        got = chunked_token_loss_sum(hidden.requires_grad_(), weight, shift_labels(labels), 5)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=LOSS_RTOL, atol=0.0)
    # A frozen head (LoRA leaves lm_head alone): only the hidden states get a gradient.
    hidden = hidden.detach().requires_grad_()
    chunked_token_loss_sum(hidden, weight, shift_labels(labels), 5).backward()
    assert hidden.grad is not None and weight.grad is None


def test_bad_arguments_are_rejected():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_loss_sum(hidden, weight, shift_labels(labels), 0)
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_token_loss_sum(hidden, weight, shift_labels(labels[:, :-1]), 4)


def test_liger_is_not_dispatched_on_cpu(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("Liger must not run on CPU tensors")

    # Make Liger look installed, so only the device keeps the CPU path.
    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = must_not_run
    for name, module in {
        "liger_kernel": types.ModuleType("liger_kernel"),
        "liger_kernel.transformers": types.ModuleType("liger_kernel.transformers"),
        "liger_kernel.transformers.functional": functional,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    chunked_loss._liger_fused_linear_cross_entropy.cache_clear()
    try:
        assert chunked_loss._liger_fused_linear_cross_entropy() is must_not_run
        assert liger_available() == torch.cuda.is_available()
        hidden, weight, labels = _inputs()
        got = chunked_token_loss_sum(hidden, weight, shift_labels(labels), 7)
        torch.testing.assert_close(got, shifted_token_loss_sum(hidden @ weight.T, labels), rtol=LOSS_RTOL, atol=0.0)
        with pytest.raises(ValueError, match="use_liger=True"):
            chunked_token_loss_sum(hidden, weight, shift_labels(labels), 7, use_liger=True)
    finally:
        chunked_loss._liger_fused_linear_cross_entropy.cache_clear()


# ------------------------------------------------------------------ the head on a real model


def _tiny_llama(tied: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY_DIR)
    config.tie_word_embeddings = tied
    torch.manual_seed(7)
    return AutoModelForCausalLM.from_config(config).float()


def _batch(vocab: int):
    g = torch.Generator().manual_seed(8)
    input_ids = torch.randint(0, vocab, (2, 24), generator=g)
    labels = input_ids.clone()
    labels[0, :9] = IGNORE_INDEX  # a prompt
    labels[1, 20:] = IGNORE_INDEX  # padding
    return input_ids, labels


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_head_on_tiny_llama_matches_the_logits_path(tied):
    model = _tiny_llama(tied)
    input_ids, labels = _batch(model.config.vocab_size)
    keys = list(model.state_dict())
    linear = model.lm_head

    plain_logits = model(input_ids=input_ids, use_cache=False).logits
    plain_loss = shifted_token_loss_sum(plain_logits, labels)
    plain_loss.backward()
    plain_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    head = install_chunked_loss_head(model, chunk_size=5)
    assert isinstance(model.lm_head, ChunkedLossHead) and head.weight is linear.weight
    assert (head.weight is model.model.embed_tokens.weight) == tied
    assert list(model.state_dict()) == keys  # still "lm_head.weight": the export loads with plain transformers
    assert install_chunked_loss_head(model, chunk_size=5) is head

    head.targets = shift_labels(labels)
    loss = model(input_ids=input_ids, use_cache=False).logits
    assert loss.dim() == 0 and head.targets is None  # consumed by the forward
    loss.backward()
    torch.testing.assert_close(loss, plain_loss, rtol=LOSS_RTOL, atol=0.0)
    for name, grad in _grads(model).items():
        scale = plain_grads[name].abs().max().item()
        torch.testing.assert_close(grad, plain_grads[name], rtol=0.0, atol=2e-6 * scale, msg=name)

    with torch.no_grad():  # targets unset: plain logits, as generation and the export probe need
        torch.testing.assert_close(model(input_ids=input_ids, use_cache=False).logits, plain_logits.detach())

    with plain_lm_head(model) as original:
        assert model.lm_head is original is linear
    assert model.lm_head is head
    assert uninstall_chunked_loss_head(model) is linear and model.lm_head is linear
    assert list(model.state_dict()) == keys


def test_saved_with_the_head_installed_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny_llama(tied=False)
    input_ids, _ = _batch(model.config.vocab_size)
    install_chunked_loss_head(model, chunk_size=5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded.lm_head) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_install_rejects_a_head_that_is_not_a_plain_linear():
    class WithBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 6, bias=True)

    with pytest.raises(ValueError, match="WithBias.*bias-free nn.Linear.*with a bias"):
        install_chunked_loss_head(WithBias(), 4)

    class Headless(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="Headless"):
        install_chunked_loss_head(Headless(), 4)


def test_memory_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "bench/chunked_loss_memory.py", "--smoke", "--json", str(out)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    result = json.loads(out.read_text())
    assert {"plain", "chunked"} <= set(result["variants"])
    assert all(v["peak_bytes"] >= 0 and v["time_s"] > 0 for v in result["variants"].values())
    assert result["loss_abs_diff"] < 1e-5


def test_a_second_backward_through_the_same_graph_is_refused():
    hidden, weight, labels = _inputs()
    hidden.requires_grad_()
    loss = chunked_token_loss_sum(hidden, weight, shift_labels(labels), 8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs only once"):
        loss.backward()

"""Cross-entropy from the last hidden states in chunks, so ``[tokens, vocab]`` float32 logits never exist whole.

With a 128k vocabulary the logits of a 4k-token micro-batch are 2 GiB in float32, and the plain path holds
several such tensors at once (the bf16 logits, their float32 copy, the softmax gradient). Here the loss head
takes the hidden states instead and walks the trained rows ``chunk_size`` at a time, so the peak is a few
``chunk_size x vocab`` buffers plus one float32 ``vocab x hidden`` gradient. The result equals
``token_loss_sum(hidden @ weight.T, targets)``; ``tests/unit/test_chunked_loss.py`` checks loss and
gradients, and ``python bench/chunked_loss_memory.py`` measures the memory saved.

On CUDA with the optional ``liger-kernel`` package installed, the same sum is taken by Liger's fused
linear cross-entropy (Triton kernels) instead.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.data.chat import IGNORE_INDEX

# ------------------------------------------------------------------ Liger (optional)


@functools.cache
def _liger_fused_linear_cross_entropy() -> Optional[Callable]:
    """Liger's functional fused linear cross-entropy, or None when ``liger-kernel`` is not installed."""
    try:
        # The functional form takes keyword arguments; the positional order of the autograd Function behind it
        # has changed between Liger releases.
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # ImportError, or a broken Triton install that fails at import time
        return None
    return liger_fused_linear_cross_entropy


def liger_available() -> bool:
    """Whether Liger's fused linear cross-entropy can run here (``liger-kernel`` importable and a CUDA device)."""
    return torch.cuda.is_available() and _liger_fused_linear_cross_entropy() is not None


def _liger_token_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    fused = _liger_fused_linear_cross_entropy()
    loss = fused(hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss.float()


# ------------------------------------------------------------------ chunked cross-entropy


_WEIGHT_GRAD_SLICE = 8192  # vocabulary rows per half-precision weight-gradient product


def _chunk_loss_and_grads(
    h: torch.Tensor,
    weight: torch.Tensor,
    t: torch.Tensor,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    grad_weight: Optional[torch.Tensor],
    groups: Optional[torch.Tensor] = None,
    group_sums: Optional[torch.Tensor] = None,
):
    """Summed cross-entropy of one chunk of rows and its gradients (and, given ``group_sums``, the rows' losses
    added into it by their ``groups``).

    The weight gradient is added into ``grad_weight`` when one is given, else returned in the weight's dtype.
    A function of its own so that the chunk's ``rows x vocab`` buffers are freed on return, before the next
    chunk allocates its own.

    Returns:
        ``(loss_sum, grad_hidden_rows or None, grad_weight or None)``.
    """
    # The matmul runs in the inputs' dtype and is upcast after, exactly as lm_head then .float() does.
    logits = F.linear(h, weight).float()
    # Log-sum-exp and softmax in place of the logits: one chunk x vocab float32 buffer, no temporaries.
    shifted = logits.sub_(logits.amax(dim=1, keepdim=True))
    target_logit = shifted.gather(1, t.unsqueeze(1)).squeeze(1)
    exp_sum = shifted.exp_().sum(dim=1)
    row_losses = exp_sum.log() - target_logit
    loss = row_losses.sum()
    if group_sums is not None:
        keep = groups >= 0  # a trained row of no group (none in collated batches) adds to no sum
        group_sums.index_add_(0, groups[keep], row_losses.detach()[keep])
    if not (need_hidden_grad or need_weight_grad):
        return loss, None, None
    grad_logits = shifted.div_(exp_sum.unsqueeze(1))  # softmax - one_hot(target) is d(loss)/d(logits)
    grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
    grad_logits = grad_logits.to(h.dtype)
    del logits, shifted  # with half-precision inputs the float32 buffer goes before the gradient matmuls
    if need_weight_grad and grad_weight is None:
        grad_weight = grad_logits.t() @ h
    elif need_weight_grad and grad_logits.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.t(), h)
    elif need_weight_grad:
        # The half-precision product is upcast as it is added; slicing the vocabulary bounds that product and
        # its float32 copy to a slice instead of two more vocab x hidden buffers.
        for start in range(0, grad_weight.size(0), _WEIGHT_GRAD_SLICE):
            stop = start + _WEIGHT_GRAD_SLICE
            grad_weight[start:stop].add_(grad_logits[:, start:stop].t() @ h)
    return loss, (grad_logits @ weight if need_hidden_grad else None), grad_weight


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, gradients computed in forward.

    The gradients are computed during the forward pass, chunk by chunk, while each chunk's logits are at hand:
    keeping the logits for backward would defeat the purpose, and recomputing them in backward would cost a
    second ``lm_head`` matmul over every trained token. The price is that the gradients are held from forward to
    backward: one ``vocab x hidden`` buffer for the weight (float32 when summed over several chunks, else in the
    weight's dtype; none when the weight is frozen) and one ``tokens x hidden`` buffer in the hidden states'
    dtype. Backward only scales them by the incoming gradient, in place, so a graph may be walked backward once
    (no ``retain_graph`` reuse).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, need_hidden_grad, need_weight_grad, groups=None, group_sums=None):
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # one host sync per call
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden_grad else None
        grad_weight = None
        if need_weight_grad and (rows.numel() > chunk_size or rows.numel() == 0):
            # Summed over chunks, so kept in float32; a single chunk's product is made directly in the weight's
            # dtype, as nn.Linear's backward makes it, and costs no float32 buffer.
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        # Only trained rows are gathered, so every chunk is full of them and ignored (prompt) tokens cost no matmul.
        for start in range(0, rows.numel(), chunk_size):
            index = rows[start : start + chunk_size]
            chunk_loss, chunk_grad_hidden, grad_weight = _chunk_loss_and_grads(
                hidden.index_select(0, index),
                weight,
                targets.index_select(0, index),
                need_hidden_grad,
                need_weight_grad,
                grad_weight,
                None if groups is None else groups.index_select(0, index),
                group_sums,
            )
            loss += chunk_loss
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, index, chunk_grad_hidden)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("chunked cross-entropy stores its gradients from forward: backward runs only once")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = (grad_hidden.float() * grad_output).to(hidden_dtype)
        if grad_weight is not None:
            # In place (computed in float32 for half-precision buffers): a second vocab x hidden buffer here would
            # be as large as the one saved.
            grad_weight = grad_weight.mul_(grad_output).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_token_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    use_liger: Optional[bool] = None,
    groups: Optional[torch.Tensor] = None,
    group_sums: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sum of next-token cross-entropies computed from the last hidden states, ``chunk_size`` rows at a time.

    Equals ``dtrain.loss.token_loss_sum(hidden @ weight.T, targets)`` in value and gradient, but holds at
    most ``chunk_size x vocab`` float32 logits at a time, in forward and backward. Position ``t`` predicts
    ``targets[:, t]`` (already shifted: ``dtrain.loss.shift_labels``); positions whose target is ``IGNORE_INDEX``
    cost nothing.

    Args:
        hidden: ``[batch, seq, hidden]`` final hidden states (after the final norm), float32 or bf16/fp16.
        weight: ``[vocab, hidden]`` output projection (``lm_head.weight``, possibly tied to the embeddings).
        targets: ``[batch, seq]`` next-token targets with ``IGNORE_INDEX`` where no loss is taken. Taking them
            shifted, rather than slicing the hidden states, keeps ``hidden.reshape(-1, H)`` a view: no copy of the
            activations, and the gradient comes back in the hidden states' own shape.
        chunk_size: trained rows per chunk; the float32 logits buffer is ``chunk_size x vocab``.
        use_liger: None takes Liger's fused kernel when it is installed and the inputs are on CUDA, False never
            does, True requires it. Liger picks its own chunking (``chunk_size`` is then unused) and accumulates
            the weight gradient in the inputs' dtype.
        groups: ``[batch, seq]`` a group per position (e.g. the mixture source); with ``group_sums`` (a float32
            tensor, one entry per group) each trained token's loss is also added, detached, into its group's entry.
            Liger returns no per-token losses, so grouped sums take the chunked path.

    Returns:
        The summed loss as a float32 scalar. A micro-batch with no trained token gives an exact zero whose
        backward still runs and yields zero gradients (every rank runs the same backward under ZeRO).

    Raises:
        ValueError: on mismatched shapes, a non-positive ``chunk_size``, or ``use_liger=True`` where Liger
            cannot run.
    """
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2] or weight.dim() != 2 or weight.size(1) != hidden.size(2):
        raise ValueError(
            f"expected hidden [B, S, H], weight [V, H], targets [B, S]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if use_liger is None:
        use_liger = hidden.is_cuda and _liger_fused_linear_cross_entropy() is not None and group_sums is None
    elif use_liger and not (hidden.is_cuda and _liger_fused_linear_cross_entropy() is not None):
        raise ValueError("use_liger=True needs the liger-kernel package and CUDA inputs")
    targets = targets.to(hidden.device)
    if use_liger:
        return _liger_token_loss_sum(hidden, weight, targets)
    targets = targets.reshape(-1)
    grad_on = torch.is_grad_enabled()
    if groups is not None:
        groups = groups.to(hidden.device).long().reshape(-1)  # aligned with the targets (shifted with them)
    return _ChunkedCrossEntropy.apply(
        hidden.reshape(-1, hidden.size(-1)),
        weight,
        targets,
        chunk_size,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        groups,
        group_sums,
    )


# ------------------------------------------------------------------ the model's output head


class ChunkedLossHead(nn.Module):
    """Drop-in ``lm_head`` that returns the summed token loss instead of logits when targets are set.

    It holds the very Parameter of the ``nn.Linear`` it replaces, so the state-dict key stays
    ``lm_head.weight``, a tie with the input embeddings is kept, and DeepSpeed ZeRO-3's module hooks gather the
    weight around this module's forward as they did for the Linear. Set ``targets`` (next-token targets,
    ``dtrain.loss.shift_labels``) before each forward of the model; the forward consumes them. With ``targets`` unset
    it returns plain logits (generation, probes).
    """

    def __init__(self, lm_head: nn.Linear, chunk_size: int):
        super().__init__()
        self.weight = lm_head.weight
        self.in_features = lm_head.in_features
        self.out_features = lm_head.out_features
        self.chunk_size = chunk_size
        self.targets: Optional[torch.Tensor] = None
        self.groups: Optional[torch.Tensor] = None
        self.group_sums: Optional[torch.Tensor] = None
        # Kept outside the module tree: registered, it would add a second copy of the weight to the state dict.
        self.__dict__["original"] = lm_head

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        targets, self.targets = self.targets, None
        groups, self.groups = self.groups, None
        if targets is None:
            return F.linear(hidden_states, self.weight)
        return chunked_token_loss_sum(hidden_states, self.weight, targets, self.chunk_size, groups=groups, group_sums=self.group_sums)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, chunk_size={self.chunk_size}"


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if head is not None else getattr(model, "lm_head", None)


def _set_output_head(model: nn.Module, head: nn.Module) -> None:
    setter = getattr(model, "set_output_embeddings", None)
    if callable(setter):
        setter(head)
    else:
        model.lm_head = head
    if _output_head(model) is not head:
        raise ValueError(f"could not replace the output head of {type(model).__name__}")


def install_chunked_loss_head(model: nn.Module, chunk_size: int) -> ChunkedLossHead:
    """Replace the model's ``lm_head`` by a ``ChunkedLossHead`` sharing its weight.

    Install it before ``deepspeed.initialize``: ZeRO-3 registers its gather hooks on the modules present then.

    Args:
        model: a causal LM whose output embedding is a bias-free ``nn.Linear`` (a PEFT wrapper is fine: its
            attribute lookups reach the base model).
        chunk_size: trained rows per chunk (``train.loss_chunk_size``).

    Returns:
        The installed head; set ``head.targets`` before each forward that should return the loss.

    Raises:
        ValueError: if the output embedding is missing, not an ``nn.Linear``, or has a bias.
    """
    head = _output_head(model)
    if isinstance(head, ChunkedLossHead):
        head.chunk_size = chunk_size
        return head
    if type(head) is not nn.Linear or head.bias is not None:
        raise ValueError(
            f"chunked loss needs the output head of {type(model).__name__} to be a bias-free "
            f"nn.Linear, found {type(head).__name__ if head is not None else None}"
            + (" with a bias" if isinstance(head, nn.Linear) and head.bias is not None else "")
        )
    chunked = ChunkedLossHead(head, chunk_size)
    _set_output_head(model, chunked)
    return chunked


def uninstall_chunked_loss_head(model: nn.Module) -> nn.Module:
    """Put the original ``nn.Linear`` back (holding the head's current weight) and return it.

    A model without a ``ChunkedLossHead`` is left as it is and its head returned.
    """
    head = _output_head(model)
    if not isinstance(head, ChunkedLossHead):
        return head
    linear = head.original
    linear.weight = head.weight  # the Parameter may have been re-tied or replaced since installation
    _set_output_head(model, linear)
    return linear


@contextmanager
def plain_lm_head(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model has its original ``nn.Linear`` head (e.g. for ``save_pretrained``)."""
    head = _output_head(model)
    if not isinstance(head, ChunkedLossHead):
        yield head
        return
    linear = uninstall_chunked_loss_head(model)
    try:
        yield linear
    finally:
        head.weight = linear.weight
        _set_output_head(model, head)

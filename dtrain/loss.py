"""Token-level cross-entropy, summed, so the trainer can normalise by the global trained-token count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtrain.data.chat import IGNORE_INDEX


def shifted_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over trained positions, in float32.

    Args:
        logits: ``[batch, seq, vocab]`` model outputs.
        labels: ``[batch, seq]`` unshifted labels with ``IGNORE_INDEX`` where no loss is taken.

    Returns:
        The summed loss (no host sync); a micro-batch with no trained token gives an exact zero that still
        depends on the logits, so every rank runs the same backward.
    """
    targets = labels[:, 1:]
    flat_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    loss_sum = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum


def count_trained_tokens(labels: torch.Tensor) -> int:
    """Positions that carry loss after the causal shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())

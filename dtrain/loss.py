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


def shifted_group_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``shifted_token_loss_sum`` and, beside it, the sum per group of tokens (e.g. per mixture source).

    Args:
        logits: ``[batch, seq, vocab]`` model outputs.
        labels: ``[batch, seq]`` unshifted labels.
        groups: ``[batch, seq]`` the group of each position (its label's group is that of the same position).
        num_groups: Groups are ``0 .. num_groups - 1``; negative entries (padding) belong to none.

    Returns:
        ``(loss sum, [num_groups] float32 sums, detached)``.
    """
    targets = labels[:, 1:].reshape(-1)
    flat_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    losses = F.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.sum(), group_sums(losses.detach(), groups[:, 1:].reshape(-1).to(losses.device), targets != IGNORE_INDEX, num_groups)


def group_sums(values: torch.Tensor, groups: torch.Tensor, keep: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Float32 sums of ``values`` per group over the positions ``keep`` selects (positions of no group, < 0, skipped)."""
    keep = keep & (groups >= 0)
    out = torch.zeros(num_groups, dtype=torch.float32, device=values.device)
    return out.index_add_(0, groups[keep].long(), values[keep].float())

"""Token-level cross-entropy, summed, so the trainer can normalise by the global trained-token count.

The causal shift is made once, by the loader (``shift_labels``): every batch it hands out carries ``targets``, where
position ``t`` holds the label of token ``t + 1``. The losses here (and ``dtrain/chunked_loss.py``) take those targets
and never shift again, so a sequence-parallel shard, cut after the shift, keeps the target of its last token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtrain.data.chat import IGNORE_INDEX


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: ``targets[b, t] = labels[b, t + 1]``, and ``IGNORE_INDEX`` at each row's last position.

    Args:
        labels: ``[batch, seq]`` unshifted labels with ``IGNORE_INDEX`` where no loss is taken.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropies of ``logits[b, t]`` against ``targets[b, t]`` over trained positions, in float32.

    Args:
        logits: ``[batch, seq, vocab]`` model outputs.
        targets: ``[batch, seq]`` next-token targets (``shift_labels``) with ``IGNORE_INDEX`` where no loss is taken.

    Returns:
        The summed loss (no host sync); a batch with no trained token gives an exact zero that still depends on the
        logits, so every rank runs the same backward.
    """
    flat_logits = logits.reshape(-1, logits.size(-1)).float()
    return F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def shifted_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``token_loss_sum`` on unshifted ``labels``: the sum of next-token cross-entropies over trained positions."""
    return token_loss_sum(logits, shift_labels(labels))


def count_trained_tokens(targets: torch.Tensor) -> int:
    """Positions that carry loss in next-token ``targets`` (``shift_labels``)."""
    return int((targets != IGNORE_INDEX).sum())


def group_loss_sums(
    logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_loss_sum`` and, beside it, the sum per group of tokens (e.g. per mixture source).

    Args:
        logits: ``[batch, seq, vocab]`` model outputs.
        targets: ``[batch, seq]`` next-token targets.
        groups: ``[batch, seq]`` the group of each target (shifted with the targets); negative: no group (padding).
        num_groups: Groups are ``0 .. num_groups - 1``.

    Returns:
        ``(loss sum, [num_groups] float32 sums, detached)``.
    """
    flat_targets = targets.reshape(-1)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.sum(), group_sums(losses.detach(), groups.reshape(-1).to(losses.device), flat_targets != IGNORE_INDEX, num_groups)


def group_sums(values: torch.Tensor, groups: torch.Tensor, keep: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Float32 sums of ``values`` per group over the positions ``keep`` selects (positions of no group, < 0, skipped)."""
    keep = keep & (groups >= 0)
    out = torch.zeros(num_groups, dtype=torch.float32, device=values.device)
    return out.index_add_(0, groups[keep].long(), values[keep].float())

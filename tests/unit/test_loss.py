"""The summed token loss matches PyTorch's mean cross-entropy times the trained-token count; the shift is made once."""

import torch
import torch.nn.functional as F

from dtrain.data import IGNORE_INDEX
from dtrain.loss import count_trained_tokens, shift_labels, shifted_token_loss_sum, token_loss_sum


def test_summed_loss_equals_mean_times_count():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    n = count_trained_tokens(shift_labels(labels))
    mean = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 13  # 18 target positions, 3 + 2 masked
    torch.testing.assert_close(shifted_token_loss_sum(logits, labels), mean * n, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(token_loss_sum(logits, shift_labels(labels)), mean * n, rtol=1e-6, atol=1e-6)


def test_targets_are_the_next_labels_and_the_last_position_is_never_trained():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 9, IGNORE_INDEX]])
    assert shift_labels(labels).tolist() == [[5, 6, 7, IGNORE_INDEX], [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]]


def test_pieces_cut_after_the_shift_sum_to_the_whole_loss():
    """Sequence parallelism cuts the targets along the sequence: no target is lost or counted twice at a cut."""
    torch.manual_seed(1)
    logits = torch.randn(2, 8, 5)
    targets = shift_labels(torch.randint(0, 5, (2, 8)))
    pieces = [token_loss_sum(logits[:, s : s + 4], targets[:, s : s + 4]) for s in (0, 4)]
    torch.testing.assert_close(sum(pieces), token_loss_sum(logits, targets), rtol=1e-6, atol=1e-6)
    assert sum(count_trained_tokens(targets[:, s : s + 4]) for s in (0, 4)) == count_trained_tokens(targets) == 14


def test_fully_masked_batch_gives_zero_not_nan_and_zero_gradient():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.full((2, 5), IGNORE_INDEX)
    loss = token_loss_sum(logits, targets)
    loss.backward()
    assert loss.item() == 0.0 and count_trained_tokens(targets) == 0
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0  # the backward ran through the logits

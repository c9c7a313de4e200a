"""The summed token loss matches PyTorch's mean cross-entropy times the trained-token count."""

import torch
import torch.nn.functional as F

from dtrain.data import IGNORE_INDEX
from dtrain.loss import count_trained_tokens, shifted_token_loss_sum


def test_summed_loss_equals_mean_times_count():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    n = count_trained_tokens(labels)
    mean = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 13  # 18 target positions, 3 + 2 masked
    torch.testing.assert_close(shifted_token_loss_sum(logits, labels), mean * n, rtol=1e-6, atol=1e-6)


def test_fully_masked_batch_gives_zero_not_nan_and_zero_gradient():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss = shifted_token_loss_sum(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and count_trained_tokens(labels) == 0
    assert torch.count_nonzero(logits.grad) == 0

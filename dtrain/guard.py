"""Step health: non-finite steps (skipped by the optimizer on every rank), loss spikes, and the failures of a
step that need their own message (out of memory, a dead peer)."""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from dtrain import faults
from dtrain.errors import PeerLost, TrainingError

SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 10


class StepGuard:
    """Counts consecutive skipped steps and spots loss spikes against the running median of good steps.

    Decisions use only values that are identical on every rank (the global loss, the global gradient norm and
    whether DeepSpeed applied the update), so every rank takes the same branch and reaches the same collectives.
    """

    def __init__(self, max_bad_steps: int, spike_factor: float, bad_in_a_row: int = 0, recent: list | None = None):
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.bad_in_a_row = bad_in_a_row
        self.recent: list[float] = list(recent or [])

    def classify(self, loss: float, step_applied: bool, fp16: bool) -> str:
        """``ok``, ``overflow`` (fp16 loss scaling skipped a step), ``nonfinite`` (skipped) or ``spike`` (applied).

        Raises:
            TrainingError: an update was applied although the loss was not finite, or after ``max_bad_steps``
                consecutive non-finite steps.
        """
        finite = math.isfinite(loss)
        if not finite and step_applied:
            raise TrainingError(
                f"the loss was {loss} but the optimizer applied the update; the weights may hold NaN/Inf now. "
                "Resume from the last checkpoint (lower train.lr, check the data of this step)"
            )
        if not step_applied:
            if finite and fp16:
                return "overflow"
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= self.max_bad_steps:
                raise TrainingError(
                    f"{self.bad_in_a_row} optimizer steps in a row had a NaN/Inf loss or gradient norm and were "
                    f"skipped (train.max_bad_steps={self.max_bad_steps}): lower train.lr, use bf16 rather than "
                    "fp16, or check the data of the logged sample ids"
                )
            return "nonfinite"
        self.bad_in_a_row = 0
        spike = len(self.recent) >= SPIKE_MIN_HISTORY and loss > self.spike_factor * statistics.median(self.recent)
        self.recent = (self.recent + [loss])[-SPIKE_WINDOW:]
        return "spike" if spike else "ok"


@contextmanager
def step_failures(step: int, rank: int, oom_report: Callable[[], str]) -> Iterator[float]:
    """Run optimizer step ``step`` (1-based), turning an out-of-memory error and a failed collective into a
    :class:`TrainingError` that says what happened (``oom_report`` is called on the failing rank only: no collective,
    the other ranks may be stuck in one).

    Yields:
        The factor for this rank's loss: 1, or Inf where the recovery tests inject a non-finite loss
        (``dtrain/faults.py``: every injected failure enters the step here).
    """
    try:
        faults.at_step_start(step, rank)
        yield faults.loss_multiplier(step, rank)
    except torch.OutOfMemoryError as e:
        raise TrainingError(oom_report()) from e
    except RuntimeError as e:
        if not is_collective_failure(e):
            raise
        raise PeerLost(
            f"rank {rank}: a collective failed in step {step} because another rank died or lost its connection "
            f"(its own error is above): {str(e).splitlines()[0][:300]}"
        ) from e


def is_collective_failure(error: RuntimeError) -> bool:
    """A communication backend's error (a peer died or timed out), as opposed to a bug in the step."""
    text = str(error)
    return any(marker in text for marker in ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out"))

"""Ranks see disjoint examples, every step's examples are independent of the micro/accum/rank layout."""

import pytest

from dtrain.data import StepSampler
from dtrain.ds_config import BatchPlan


def step_sets(n, micro, accum, world, epoch=0, seed=0):
    """Per step: the set of example indices all ranks together consume."""
    per_rank = [list(StepSampler(n, BatchPlan(micro, accum, world), r, seed).steps(epoch)) for r in range(world)]
    steps = []
    for s in range(len(per_rank[0])):
        seen = [i for r in range(world) for micro_batch in per_rank[r][s] for i in micro_batch]
        assert len(seen) == len(set(seen)) == micro * accum * world  # disjoint across ranks and micro-batches
        steps.append(frozenset(seen))
    return steps


def test_layout_does_not_change_the_examples_of_a_step():
    a = step_sets(50, micro=4, accum=1, world=1)
    b = step_sets(50, micro=1, accum=4, world=1)
    c = step_sets(50, micro=1, accum=2, world=2)
    assert a == b == c and len(a) == 12


def test_epoch_covers_the_data_and_reshuffles():
    steps = step_sets(64, micro=2, accum=2, world=2)
    assert frozenset().union(*steps) == frozenset(range(64))
    sampler = StepSampler(64, BatchPlan(2, 2, 2), 0, seed=0)
    assert sampler.epoch_order(0) != sampler.epoch_order(1)
    assert sampler.epoch_order(0) == StepSampler(64, BatchPlan(2, 2, 2), 1, seed=0).epoch_order(0)  # same on all ranks


@pytest.mark.parametrize("n", [10, 33, 64])
def test_every_rank_gets_the_same_number_of_micro_batches(n):
    counts = {len([m for step in StepSampler(n, BatchPlan(2, 2, 2), r, 1).steps(0) for m in step]) for r in range(2)}
    assert len(counts) == 1
    assert StepSampler(n, BatchPlan(2, 2, 2), 0, 1).unused_per_epoch == n % 8


def test_length_grouping_cuts_padding_and_keeps_the_guarantees():
    import random as _random

    rng = _random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(640)]

    def efficiency(grouped):
        real = slots = 0
        for rank in range(2):
            for step in StepSampler(640, BatchPlan(8, 1, 2), rank, 0, lengths if grouped else None).steps(0):
                for idx in step:
                    sizes = [lengths[i] for i in idx]
                    real, slots = real + sum(sizes), slots + max(sizes) * len(sizes)
        return real / slots

    assert efficiency(True) > 0.95 > efficiency(False)
    grouped = [list(StepSampler(640, BatchPlan(8, 1, 2), r, 0, lengths).steps(0)) for r in range(2)]
    seen = [i for steps in grouped for step in steps for mb in step for i in mb]
    assert sorted(seen) == list(range(640))  # still every example once per epoch, disjoint across ranks
    assert StepSampler(640, BatchPlan(8, 1, 2), 0, 0, lengths).epoch_order(1) != StepSampler(640, BatchPlan(8, 1, 2), 0, 0, lengths).epoch_order(0)


def test_resuming_mid_epoch_yields_the_remaining_batches_exactly():
    sampler = StepSampler(100, BatchPlan(2, 2, 2), 1, seed=5, lengths=list(range(100)))
    full = list(sampler.steps(3))
    assert list(StepSampler(100, BatchPlan(2, 2, 2), 1, seed=5, lengths=list(range(100))).steps(3, start_step=4)) == full[4:]

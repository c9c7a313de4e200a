"""The prefetcher hands out exactly the sampler's steps in order, collated ahead, and stops cleanly."""

import threading
import time

import pytest
import torch

from dtrain.data.prefetch import Prefetcher


def collate(indices):
    return {"input_ids": torch.tensor(indices)}


def test_steps_arrive_in_order_with_their_batches():
    steps = [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    with Prefetcher(iter(steps), collate) as prefetched:
        got = list(prefetched)
    assert [m for m, _, _ in got] == steps
    assert [[b["input_ids"].tolist() for b in batches] for _, batches, _ in got] == steps
    assert all(wait >= 0 for _, _, wait in got)


def test_collation_runs_ahead_of_the_consumer():
    collated = []

    def slow_consumer_collate(indices):
        collated.append(indices)
        return collate(indices)

    with Prefetcher(iter([[[i]] for i in range(10)]), slow_consumer_collate, depth=2) as prefetched:
        first = next(iter(prefetched))
        time.sleep(0.3)  # the step computes; meanwhile the next steps are collated
        assert first[0] == [[0]] and len(collated) >= 3  # the first, plus `depth` waiting in the queue


def test_an_error_while_collating_reaches_the_training_thread():
    def broken(indices):
        if indices == [2]:
            raise ValueError("bad example 2")
        return collate(indices)

    with Prefetcher(iter([[[0]], [[1]], [[2]], [[3]]]), broken) as prefetched:
        seen = []
        with pytest.raises(ValueError, match="bad example 2"):
            for micro, _, _ in prefetched:
                seen.append(micro)
    assert seen == [[[0]], [[1]]]


def test_leaving_the_loop_early_stops_the_thread():
    endless = ([[i]] for i in iter(int, 1))  # never ends
    with Prefetcher(endless, collate) as prefetched:
        for _step, _ in zip(prefetched, range(3)):
            pass
    assert not any(t.name == "dtrain-prefetch" and t.is_alive() for t in threading.enumerate())

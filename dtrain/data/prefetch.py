"""Collate the next steps' micro-batches in a background thread while the current step computes.

The sampler decides what each step holds; this only moves the collation (padding or packing into tensors, and
pinning them in page-locked memory on a GPU machine so the copy to the device can overlap) off the training
thread. Order and content are exactly those of the sampler.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterable, Iterator

import torch

_END = object()


class Prefetcher:
    """Iterates ``(micro_indices, batches, wait_s)`` for each step of ``steps``, collated ``depth`` steps ahead.

    ``wait_s`` is how long the training thread waited for this step's batches (the data phase of the step).
    Use as a context manager, so the thread stops when the loop ends early (preemption, an error, max steps).
    """

    def __init__(
        self,
        steps: Iterable[list[list[int]]],
        collate: Callable[[list[int]], dict[str, torch.Tensor]],
        depth: int = 2,
        pin_memory: bool = False,
    ):
        self._steps = steps
        self._collate = collate
        self._pin = pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="dtrain-prefetch", daemon=True)

    def _work(self) -> None:
        try:
            for micro_indices in self._steps:
                batches = [self._collate(idx) for idx in micro_indices]
                if self._pin:
                    batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
                if not self._put((micro_indices, batches)):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the training thread, which raises it
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __iter__(self) -> Iterator[tuple[list[list[int]], list[dict[str, torch.Tensor]], float]]:
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            wait = time.perf_counter() - t0
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            micro_indices, batches = item
            yield micro_indices, batches, wait

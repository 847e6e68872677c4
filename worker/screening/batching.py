"""Micro-batching: many threads each ask for one forward pass; one thread runs them together.

A worker that takes several studies at once (Celery's threads pool) decodes and
preprocesses each in its own thread, then hands the model input to the batcher. The
batcher runs one forward pass for up to ``max_batch`` inputs, or for whatever arrived within
``max_wait_ms`` of the first, and gives each caller its own row back. It waits only while more
inputs are on their way (``coming``: callers still decoding), so a study screened alone, such
as an interactive POST /predict, pays no batching delay. Everything else
(acknowledgement, failure, Grad-CAM, storing) stays per study.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any
from concurrent.futures import Future

import numpy as np

log = logging.getLogger(__name__)
# A batched step: the stacked inputs (N, C, H, W) and each caller's argument -> one result per row.
Step = Callable[[np.ndarray, list[Any]], list[Any]]


class MicroBatcher:
    def __init__(self, forward: Step, *, max_batch: int, max_wait_ms: float,
                 coming: Callable[[], int] = lambda: 1) -> None:
        if max_batch < 2:
            raise ValueError("max_batch must be at least 2 to batch anything")
        self.forward = forward
        self.coming = coming  # how many more inputs are expected soon (0: run what is here)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self._queue: queue.Queue[tuple[np.ndarray, Any, Future]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="cxr-batcher", daemon=True)
        self._thread.start()

    def __call__(self, x: np.ndarray, arg: Any = None) -> tuple[Any, int]:
        """One input (1, C, H, W) and its argument -> (its row of the step's result, batch size)."""
        future: Future = Future()
        self._queue.put((x, arg, future))
        return future.result()

    def _collect(self) -> list[tuple[np.ndarray, Any, Future]]:
        items = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            try:
                items.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.coming() <= 0:
                break
            try:  # look again soon: a caller may finish decoding, or give up waiting
                items.append(self._queue.get(timeout=min(remaining, 0.002)))
            except queue.Empty:
                continue
        return items

    def _run(self) -> None:
        while True:
            items = self._collect()
            try:
                rows = self.forward(np.concatenate([x for x, _, _ in items]), [a for _, a, _ in items])
            except Exception as e:  # handed to every caller of this batch, who records it per study
                log.exception("batched forward pass of %d studies failed", len(items))
                for _, _, future in items:
                    future.set_exception(e)
                continue
            for row, (_, _, future) in zip(rows, items):
                future.set_result((row, len(items)))

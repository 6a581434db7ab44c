"""Dynamic batching of classify requests; JAX runs on a worker thread, never on the loop.

Requests for the same served path and image shape are merged into one forward call of at
most ``max_batch_size`` images, waiting at most ``max_delay_ms`` for more to arrive. The
batch is padded to a power-of-two bucket compiled at load time.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
import time
from typing import Callable

import numpy as np

from mu2net.server.snapshot import ServedPath, bucket_for


@dataclasses.dataclass
class _Request:
    served: ServedPath
    images: np.ndarray
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.served.path.id, self.images.shape[1:]


class Batcher:
    """Merges concurrent requests into batches run on one worker thread.

    Args:
      max_batch_size: most images per forward call.
      max_delay_ms: longest wait for more requests after the first one of a batch.
      on_batch: called with the real batch size of every forward call (metrics).
    """

    def __init__(self, max_batch_size: int = 64, max_delay_ms: float = 2.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    async def predict(self, served: ServedPath, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, classes] float32`` for ``images [N,H,W,C] uint8`` on ``served``."""
        loop = asyncio.get_running_loop()
        if len(images) <= self.max_batch_size:  # the common case: one chunk, no gather/concatenate
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            self._queue.put(_Request(served, images, fut, loop))
            return await fut
        chunks = [images[i:i + self.max_batch_size] for i in range(0, len(images), self.max_batch_size)]
        futures: list[asyncio.Future[np.ndarray]] = []
        for chunk in chunks:
            fut = loop.create_future()
            self._queue.put(_Request(served, chunk, fut, loop))
            futures.append(fut)
        return np.concatenate(await asyncio.gather(*futures))

    def _run(self) -> None:
        held: collections.deque[_Request] = collections.deque()
        while True:
            first = held.popleft() if held else self._queue.get()
            if first is None:
                return
            batch, size = [first], len(first.images)
            deadline = time.monotonic() + self.max_delay
            others: list[_Request] = []
            while size < self.max_batch_size:
                try:
                    nxt = held.popleft() if held else self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                if nxt.key == first.key and size + len(nxt.images) <= self.max_batch_size:
                    batch.append(nxt)
                    size += len(nxt.images)
                else:
                    others.append(nxt)
                if time.monotonic() >= deadline:
                    break
            held.extend(others)
            self._execute(batch, size)

    def _execute(self, batch: list[_Request], size: int) -> None:
        try:
            images = np.concatenate([r.images for r in batch])
            padded = bucket_for(size, self.max_batch_size)
            if padded > size:
                images = np.concatenate([images, np.zeros((padded - size,) + images.shape[1:], images.dtype)])
            probs = batch[0].served.predict(images)[:size]
            if self.on_batch is not None:
                self.on_batch(size)
        except Exception as e:  # deliver the failure to every waiting request
            for r in batch:
                r.loop.call_soon_threadsafe(_set_exception, r.future, e)
            return
        offset = 0
        for r in batch:
            n = len(r.images)
            r.loop.call_soon_threadsafe(_set_result, r.future, probs[offset:offset + n])
            offset += n

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


def _set_result(fut: asyncio.Future[np.ndarray], value: np.ndarray) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[np.ndarray], error: Exception) -> None:
    if not fut.done():
        fut.set_exception(error)

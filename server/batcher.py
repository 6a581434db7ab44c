"""Dynamic batching of classify requests; JAX runs on a worker thread, never on the loop.

Requests for the same served path and image shape are merged into one forward call of at
most ``max_batch_size`` images, waiting at most ``max_delay_ms`` for more to arrive. The
batch is padded to a power-of-two bucket compiled at load time. With ``cross_task`` (the
default), requests of different tasks are merged too when their paths differ only in their
heads and they read the same snapshot version: the shared trunk runs once for all of them
(:mod:`mu2net.server.grouping`; every request's probabilities are bit-identical to its own
path's forward on the same padded batch).

Load is bounded: at most ``max_queued_images`` images wait or run at once; beyond that a
request fails at once with :class:`mu2net.server.errors.Overloaded` (429 /
RESOURCE_EXHAUSTED, with a retry hint). A request with a deadline is also refused at
admission when the work queued ahead of it would take longer than its deadline leaves
(deadline-aware admission: load shedding at the door instead of queueing a request that
would expire unrun). The queued work's duration is estimated as the queued images,
this request's included, times a moving average of forward seconds per padded row over
batches at least half full (what a queue of full batches drains at; one estimate for
every path and image shape); a queue shorter than one batch is never shed for it. A
request whose deadline has passed, or whose caller went away (its future cancelled), is
dropped before it is computed, and a cancelled request stops counting as queued at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
import time
from typing import Any, Callable

import numpy as np

from mu2net.server import errors as E
from mu2net.server.grouping import grouped_probabilities, trunk_key
from mu2net.server.snapshot import ServedPath, bucket_for


@dataclasses.dataclass
class _Request:
    served: ServedPath
    images: np.ndarray
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() after which the request is not computed
    released: bool = False  # its images no longer count in Batcher.queued_images
    running: bool = False  # taken into a forward call (its count is released when that ends)
    #: what it may share a forward call with: (path id, image shape), or with cross-task
    #: batching (snapshot version, image shape, trunk component ids)
    key: tuple[Any, ...] = ()


class Batcher:
    """Merges concurrent requests into batches run on one worker thread.

    Args:
      max_batch_size: most images per forward call.
      max_delay_ms: longest wait for more requests after the first one of a batch.
      on_batch: called with the real batch size and the number of served paths of every
        forward call (metrics).
      max_queued_images: most images waiting or running at once (None: unbounded).
      deadline_admission: refuse a request with a deadline at once (Overloaded) when the
        queued work is estimated to outlast it (:meth:`queue_seconds`).
      cross_task: merge requests of paths that differ only in their heads (same snapshot
        version, same image shape) into one forward call (:mod:`mu2net.server.grouping`).
    """

    #: Weight of the newest batch in the seconds-per-image moving average.
    RATE_EWMA = 0.2

    def __init__(self, max_batch_size: int = 64, max_delay_ms: float = 2.0,
                 on_batch: Callable[[int, int], None] | None = None, max_queued_images: int | None = None,
                 deadline_admission: bool = True, cross_task: bool = True) -> None:
        self.cross_task = cross_task
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.on_batch = on_batch
        self.max_queued_images = max_queued_images
        self.deadline_admission = deadline_admission
        self.queued_images = 0
        self.dropped = 0
        #: requests refused at admission because the queue would outlast their deadline
        self.shed = 0
        #: moving average of forward seconds per padded row over batches at least half full
        #: (None until one ran): what a queue of full batches drains at
        self.seconds_per_image: float | None = None
        self._count_lock = threading.Lock()
        self._closed = False
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    async def predict(self, served: ServedPath, images: np.ndarray, timeout: float | None = None,
                      snapshot_version: int = -1) -> np.ndarray:
        """Probabilities ``[N, classes] float32`` for ``images [N,H,W,C] uint8`` on ``served``.

        Args:
          timeout: seconds the caller waits (its deadline); images not started by then
            are dropped unrun.
          snapshot_version: the version of the snapshot ``served`` was read from; with
            ``cross_task``, only requests of the same version share a forward call.

        Raises:
          Overloaded: more than ``max_queued_images`` would be queued, or (with
            ``deadline_admission``) the queued work outlasts ``timeout``.
          DeadlineExceeded: the deadline passed before the images ran.
        """
        n = len(images)
        if self._closed:
            raise E.NotReady("the server is shutting down; retry on another replica or after it restarts")
        if self.max_queued_images is not None and n > self.max_queued_images:
            raise E.TooLarge(f"{n} images in one request; this server queues at most {self.max_queued_images}")
        with self._count_lock:
            if self.max_queued_images is not None and self.queued_images + n > self.max_queued_images:
                raise E.Overloaded(f"{self.queued_images} images are queued and this request adds {n}; at most "
                                   f"{self.max_queued_images} may be queued; retry in {E.Overloaded.retry_after} s")
            if self.deadline_admission and timeout is not None:
                ahead = self.queue_seconds(self.queued_images + n)
                if ahead is not None and ahead > timeout and self.queued_images >= self.max_batch_size:
                    self.shed += 1
                    raise E.Overloaded(
                        f"{self.queued_images} images are queued, about {ahead:.2f} s of work with this request, "
                        f"and its deadline leaves {max(timeout, 0.0):.2f} s: it would expire unrun; retry in "
                        f"{E.Overloaded.retry_after} s or with a longer deadline")
            self.queued_images += n
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks = [images[i:i + self.max_batch_size] for i in range(0, n, self.max_batch_size)] or [images]
        futures: list[asyncio.Future[np.ndarray]] = []
        requests: list[_Request] = []
        key = ((snapshot_version, images.shape[1:], trunk_key(served.path)) if self.cross_task
               else (served.path.id, images.shape[1:]))
        for chunk in chunks:
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            requests.append(_Request(served, chunk, fut, loop, deadline, key=key))
            self._queue.put(requests[-1])
            futures.append(fut)
        try:
            if len(futures) == 1:  # the common case: one chunk, no gather/concatenate
                return await futures[0]
            return np.concatenate(await asyncio.gather(*futures))
        except asyncio.CancelledError:  # the caller went away: its queued chunks are dropped unrun
            for fut in futures:
                fut.cancel()
            for r in requests:  # and no longer count as queued work (admission and the bound)
                if not r.running:
                    self._release_request(r)
            raise

    def queue_seconds(self, images: int) -> float | None:
        """Estimated seconds to compute ``images`` queued images: ``images`` times
        :attr:`seconds_per_image` (None before a batch at least half full has run)."""
        spi = self.seconds_per_image
        return None if spi is None else images * spi

    def _release_request(self, request: _Request) -> None:
        """Uncounts a request's images once (whichever of its end, its drop or its caller's
        cancellation comes first)."""
        with self._count_lock:
            if not request.released:
                request.released = True
                self.queued_images -= len(request.images)

    def _live(self, request: _Request) -> bool:
        """False (and the request finished) for a request not worth computing any more."""
        if request.future.cancelled():
            self.dropped += 1
            self._release_request(request)
            return False
        if request.deadline is not None and time.monotonic() > request.deadline:
            self.dropped += 1
            self._release_request(request)
            _deliver(request, _set_exception, E.DeadlineExceeded(
                "the request's deadline passed before its images were computed; they were not run"))
            return False
        return True

    def _run(self) -> None:
        held: collections.deque[_Request] = collections.deque()
        while True:
            first = held.popleft() if held else self._queue.get()
            if first is None:
                return
            if not self._live(first):
                continue
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
                if not self._live(nxt):
                    continue
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
        for r in batch:
            r.running = True
        try:
            answers: list[np.ndarray] | None = self._compute(batch, size)
            error: Exception | None = None
        except Exception as e:  # delivered to every waiting request
            answers, error = None, e
        finally:
            for r in batch:  # uncounted before the answers go out: a caller may resubmit at once
                self._release_request(r)
        for i, r in enumerate(batch):
            if answers is None:
                _deliver(r, _set_exception, error)
            else:
                _deliver(r, _set_result, answers[i])

    def _compute(self, batch: list[_Request], size: int) -> list[np.ndarray]:
        """One forward call for the batch; each request's probabilities, in batch order."""
        images = np.concatenate([r.images for r in batch])
        padded = bucket_for(size, self.max_batch_size)
        if padded > size:
            images = np.concatenate([images, np.zeros((padded - size,) + images.shape[1:], images.dtype)])
        started = time.perf_counter()
        paths = len({r.served.path.id for r in batch})
        if paths == 1:
            probs = batch[0].served.predict(images)
            answers, offset = [], 0
            for r in batch:
                answers.append(probs[offset:offset + len(r.images)])
                offset += len(r.images)
        else:  # one trunk, several heads (cross-task batching)
            answers = grouped_probabilities([(r.served, len(r.images)) for r in batch], images)
        if 2 * size >= self.max_batch_size:
            # per padded row: a queue drains in full batches, whose rows all carry images
            spi = (time.perf_counter() - started) / padded
            old = self.seconds_per_image
            self.seconds_per_image = spi if old is None else old + self.RATE_EWMA * (spi - old)
        if self.on_batch is not None:
            self.on_batch(size, paths)
        return answers

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)


def _deliver(request: _Request, setter: Callable[..., None], value: object) -> None:
    """Hands a result to the request's event loop; a loop already closed (its caller gone)
    must not kill the batcher thread."""
    try:
        request.loop.call_soon_threadsafe(setter, request.future, value)
    except RuntimeError:
        pass


def _set_result(fut: asyncio.Future[np.ndarray], value: np.ndarray) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[np.ndarray], error: Exception) -> None:
    if not fut.done():
        fut.set_exception(error)

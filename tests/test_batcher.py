"""The dynamic batcher's load bounds: queued images capped, expired and abandoned requests dropped unrun."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time

import numpy as np
import pytest

from mu2net.server import errors as E
from mu2net.server.batcher import Batcher


@dataclasses.dataclass
class _Path:
    id: str = "p"
    component_ids: tuple[str, ...] = ("trunk", "head")


class SlowServed:
    """Stands in for a ServedPath: each forward call blocks until released, and is counted."""

    def __init__(self) -> None:
        self.path = _Path()
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.entered = threading.Event()  # a forward call has started (and blocks)

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(10)
        self.calls.append(len(images))
        return np.full((len(images), 2), 0.5, np.float32)


def test_queued_images_are_bounded_and_expired_or_abandoned_requests_are_not_computed():
    async def scenario() -> None:
        served = SlowServed()
        batcher = Batcher(max_batch_size=4, max_delay_ms=0.0, max_queued_images=6)
        images = np.zeros((3, 8, 8, 1), np.uint8)
        first = asyncio.ensure_future(batcher.predict(served, images))  # runs (blocked in predict)
        await asyncio.sleep(0.1)
        expiring = asyncio.ensure_future(batcher.predict(served, images[:1], timeout=0.05))
        abandoned = asyncio.ensure_future(batcher.predict(served, images[:1]))
        await asyncio.sleep(0.05)
        with pytest.raises(E.Overloaded, match="at most 6 may be queued"):
            await batcher.predict(served, images)  # 3 + 1 + 1 queued, 3 more exceed 6
        abandoned.cancel()
        await asyncio.sleep(0.1)  # the deadline of `expiring` passes while the first batch runs
        served.gate.set()
        assert (await first).shape == (3, 2)
        with pytest.raises(E.DeadlineExceeded):
            await expiring
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        await asyncio.sleep(0.1)
        assert served.calls == [4]  # one (padded) batch: neither the expired nor the abandoned request ran
        assert batcher.dropped == 2 and batcher.queued_images == 0
        assert (await batcher.predict(served, images)).shape == (3, 2)  # capacity is back
        batcher.close()

    asyncio.run(scenario())


class TimedServed(SlowServed):
    """Each forward call takes at least 0.2 s (after the gate opens)."""

    def predict(self, images: np.ndarray) -> np.ndarray:
        time.sleep(0.2)
        return super().predict(images)


def test_a_request_whose_deadline_the_queue_outlasts_is_refused_at_admission():
    async def scenario() -> None:
        served = TimedServed()
        served.gate.set()
        batcher = Batcher(max_batch_size=4, max_delay_ms=0.0, max_queued_images=100)
        images = np.zeros((4, 8, 8, 1), np.uint8)
        assert batcher.queue_seconds(10) is None  # nothing measured yet: nothing refused for it
        await batcher.predict(served, images)
        spi = batcher.seconds_per_image
        assert spi is not None and spi >= 0.2 / 4
        try:  # a short queue is never shed, even for a deadline shorter than one image's compute
            await batcher.predict(served, images[:1], timeout=0.001)
        except E.DeadlineExceeded:
            pass  # admitted, then expired before the batcher thread reached it: not refused
        assert batcher.shed == 0
        dropped = batcher.dropped  # 0, or 1 for that expired request
        served.gate.clear()
        queued = [asyncio.ensure_future(batcher.predict(served, images)) for _ in range(2)]  # 8 images ahead
        await asyncio.sleep(0.05)
        with pytest.raises(E.Overloaded, match=r"8 images are queued, about .* s of work .* deadline leaves 0.10 s"):
            await batcher.predict(served, images[:1], timeout=0.1)  # >= 9 x 0.05 s ahead
        assert batcher.shed == 1 and batcher.queued_images == 8  # the refused request queued nothing
        patient = asyncio.ensure_future(batcher.predict(served, images[:1], timeout=30.0))
        no_deadline = asyncio.ensure_future(batcher.predict(served, images[:1]))
        await asyncio.sleep(0.05)
        served.gate.set()
        for f in [*queued, patient, no_deadline]:
            assert (await f).shape[1] == 2
        for _ in range(100):  # the batcher thread releases a batch's count after delivering it
            if batcher.queued_images == 0:
                break
            await asyncio.sleep(0.02)
        assert batcher.shed == 1 and batcher.dropped == dropped and batcher.queued_images == 0
        off = Batcher(max_batch_size=4, max_delay_ms=0.0, deadline_admission=False)
        off.seconds_per_image = 10.0  # even a queue that would outlast every deadline...
        served.gate.clear()
        ahead = [asyncio.ensure_future(off.predict(served, images)) for _ in range(2)]
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(off.predict(served, images[:1], timeout=0.1))  # ...is joined
        await asyncio.sleep(0.2)
        served.gate.set()
        with pytest.raises(E.DeadlineExceeded):
            await late
        for f in ahead:
            await f
        assert off.shed == 0 and off.dropped == 1
        batcher.close()
        off.close()

    asyncio.run(scenario())


def test_an_overloaded_http_answer_is_a_429_with_retry_after(tmp_path):
    import httpx

    from mu2net.server.http_api import build_app

    class Full:
        metrics = None

        async def classify(self, *a, **k):
            raise E.Overloaded("16384 images are queued")

        @contextlib.contextmanager
        def request_slot(self, method):
            yield

        class config:
            max_message_bytes = 1 << 20

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_app(Full(), str(tmp_path)))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/tasks/x/classify", content=b"png")

    r = asyncio.run(post())
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "queued" in r.json()["error"]


def test_concurrent_uploads_are_bounded(tmp_path):
    from mu2net.server.service import Service, ServiceConfig
    from mu2net.store import Store

    store = Store(tmp_path / "store")
    service = Service(store, ServiceConfig(max_concurrent_uploads=2))
    try:
        with service.upload_slot(), service.upload_slot():
            with pytest.raises(E.Overloaded, match="2 uploads are in progress"):
                with service.upload_slot():
                    pass
        with service.upload_slot():  # slots come back when uploads end, also by an error
            pass
        with pytest.raises(RuntimeError):
            with service.upload_slot():
                raise RuntimeError("ingestion failed")
        with service.upload_slot(), service.upload_slot():
            pass
        assert service.ingest_pool._max_workers == 2  # ingestion has threads of its own
    finally:
        service.close()
        store.close()


def test_an_http_client_that_disconnects_has_its_images_dropped_unrun(tmp_path):
    """A real uvicorn server and a raw socket client that sends a classify and hangs up."""
    import socket

    import uvicorn

    from mu2net.server.http_api import build_app

    served = SlowServed()  # the forward pass blocks until the gate opens
    batcher = Batcher(max_batch_size=4, max_delay_ms=0.0)

    class Service:
        metrics = None
        cancelled = asyncio.Event()

        @contextlib.contextmanager
        def request_slot(self, method):
            yield

        async def classify(self, task, *, encoded=(), raw=None, top_k=1, clip_top_k=False, timeout=None):
            try:  # queued behind the blocked forward pass of another caller's image
                await batcher.predict(served, np.zeros((2, 8, 8, 1), np.uint8))
            except asyncio.CancelledError:
                Service.cancelled.set()
                raise

        class config:
            max_message_bytes = 1 << 20

    async def scenario() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(build_app(Service(), str(tmp_path)), host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off"))
        serving = asyncio.ensure_future(server.serve())
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.02)
        assert server.started
        blocker = asyncio.ensure_future(batcher.predict(served, np.zeros((1, 8, 8, 1), np.uint8)))
        for _ in range(500):  # its forward pass has started alone, so the request below queues behind it
            if served.entered.is_set():
                break
            await asyncio.sleep(0.02)
        assert served.entered.is_set()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/tasks/x/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\npng")
        await writer.drain()
        for _ in range(500):  # the blocker's image in the (blocked) forward pass, the request's two queued
            if batcher.queued_images == 3:
                break
            await asyncio.sleep(0.02)
        assert batcher.queued_images == 3
        writer.close()  # the client hangs up before the answer
        await asyncio.wait_for(Service.cancelled.wait(), 10)
        assert batcher.queued_images == 1  # the cancelled images no longer count as queued work
        served.gate.set()  # the blocker's forward pass finishes...
        assert (await blocker).shape == (1, 2)
        for _ in range(500):
            if batcher.dropped:
                break
            await asyncio.sleep(0.02)
        assert batcher.dropped == 1 and served.calls == [1]  # ...and the request's images were dropped unrun
        assert batcher.queued_images == 0
        server.should_exit = True
        await serving

    try:
        asyncio.run(scenario())
    finally:
        batcher.close()

"""The dynamic batcher's load bounds: queued images capped, expired and abandoned requests dropped unrun."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import pytest

from mu2net.server import errors as E
from mu2net.server.batcher import Batcher


@dataclasses.dataclass
class _Path:
    id: str = "p"


class SlowServed:
    """Stands in for a ServedPath: each forward call blocks until released, and is counted."""

    def __init__(self) -> None:
        self.path = _Path()
        self.calls: list[int] = []
        self.gate = threading.Event()

    def predict(self, images: np.ndarray) -> np.ndarray:
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


def test_an_overloaded_http_answer_is_a_429_with_retry_after(tmp_path):
    import httpx

    from mu2net.server.http_api import build_app

    class Full:
        metrics = None

        async def classify(self, *a, **k):
            raise E.Overloaded("16384 images are queued")

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

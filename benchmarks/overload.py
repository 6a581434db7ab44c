"""Overload: a real ``mu2net serve`` offered several times the traffic it can compute.

1. Capacity: closed-loop Classify throughput (``--clients`` threads, ``--batch`` images
   per request, raw uint8 tensors) for ``--warm-seconds``, over gRPC or, with
   ``--protocol http``, HTTP (``POST /v1/tasks/{name}/classify``, httpx).
2. Overload: an open-loop client (grpc.aio, or httpx.AsyncClient) sends requests at
   ``--factor`` x that rate for ``--seconds``, whatever the answers, each with a
   ``--deadline`` (a gRPC deadline, or HTTP's ``?timeout_ms=``; HTTP 429 is counted as
   RESOURCE_EXHAUSTED and 504 as DEADLINE_EXCEEDED), and at
   most ``--max-in-flight`` requests outstanding (a client-side bound, so the client itself
   does not exhaust memory; requests it cannot send in time are counted as not sent).
   Reported: answers per status (OK, RESOURCE_EXHAUSTED: refused with a retry hint by the
   batcher's queue bound, DEADLINE_EXCEEDED, others), the admitted requests' p50/p99
   latency, the server's resident memory (sampled every 0.5 s: at start, peak, end) against
   its bound, and whether the server is alive and answers normally afterwards.

The bound on the server's memory under overload: the batcher queues at most
``--max-queued-images`` images (``mu2net serve`` default 16384) and every request beyond
that is refused before it is decoded into the queue; gRPC holds at most the messages in
flight. So RSS may grow by about the queued images (16384 x 28 x 28 x 1 bytes = 12.8 MB
here) plus gRPC's buffers, and must not keep growing with time.

    python benchmarks/overload.py --compare --out docs/overload.json
    python benchmarks/overload.py --protocol http --out docs/overload_http.json

With ``--compare`` the same load then runs against a second server on the same store with
``--no-deadline-admission`` (requests queue until the queue bound even when they would
expire unrun), and the goodput ratio of the two is reported.

The run needs the machine to itself (it measures throughput and latency).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import threading
import time
from typing import Any

import numpy as np

from mu2net import root as R
from mu2net.server.launcher import RunningServer
from report import write_json
from serving import closed_loop, grpc_throughput, make_store


def _open_loop(send: Any, client: Any, rate: float, seconds: float, max_in_flight: int) -> dict[str, Any]:
    """Calls ``await send(session)`` (it returns the answer's status name: ``OK``,
    ``RESOURCE_EXHAUSTED``, ...) at ``rate`` requests/s for ``seconds``, whatever the answers,
    with at most ``max_in_flight`` outstanding; ``client()`` is an async context manager
    giving the session. Returns counts per status, ``ok_in_window`` (OK answers that came
    within the ``seconds``: the goodput's numerator; answers drained after it are counted in
    ``codes`` only), ``drain_seconds`` (from the window's end to the last answer) and the
    admitted (OK) requests' p50/p99, measured by this client."""
    codes: dict[str, int] = {}
    latencies: list[float] = []
    not_sent = 0
    ok_in_window = 0
    start = 0.0

    async def one(session: Any) -> None:
        nonlocal ok_in_window
        t0 = time.perf_counter()
        code = await send(session)
        if code == "OK":
            t1 = time.perf_counter()
            latencies.append(t1 - t0)
            ok_in_window += t1 - start <= seconds
        codes[code] = codes.get(code, 0) + 1

    async def main() -> None:
        nonlocal not_sent, start
        async with client() as session:
            pending: set[asyncio.Task[None]] = set()
            start = time.perf_counter()
            n = 0
            while (now := time.perf_counter()) - start < seconds:
                due = int((now - start) * rate) + 1  # requests that should have been sent by now
                while n < due:
                    n += 1
                    if len(pending) >= max_in_flight:
                        not_sent += 1
                        continue
                    task_ = asyncio.ensure_future(one(session))
                    pending.add(task_)
                    task_.add_done_callback(pending.discard)
                await asyncio.sleep(0.001)
            if pending:
                await asyncio.wait(pending)
            drain[0] = time.perf_counter() - start - seconds

    drain = [0.0]
    asyncio.run(main())
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    sent = sum(codes.values())
    return {"offered_requests": sent + not_sent, "sent": sent, "not_sent_client_bound": not_sent,
            "codes": codes, "ok_in_window": ok_in_window, "drain_seconds": round(max(0.0, drain[0]), 2),
            "refused_share": round(codes.get("RESOURCE_EXHAUSTED", 0) / max(1, sent), 3),
            "admitted_p50_ms": round(float(np.percentile(lat, 50)), 1),
            "admitted_p99_ms": round(float(np.percentile(lat, 99)), 1)}


def overload(server: RunningServer, task: str, images: np.ndarray, rate: float, seconds: float,
             deadline: float, max_in_flight: int, protocol: str = "grpc") -> dict[str, Any]:
    """Open-loop load at ``rate`` requests/s for ``seconds`` over gRPC (a ``deadline`` s gRPC
    deadline) or HTTP (``POST /v1/tasks/{task}/classify`` with a raw tensor body and
    ``?timeout_ms=``; 429 counts as RESOURCE_EXHAUSTED, 504 as DEADLINE_EXCEEDED, 503 as
    UNAVAILABLE, others as ``HTTP <code>``). Unlike a gRPC deadline, ``timeout_ms`` counts
    from the handler's entry: time queued in uvicorn before it is not in it, so an admitted
    HTTP request may take longer than ``deadline``; see the module docstring."""
    if protocol == "grpc":
        import grpc

        from mu2net_client._proto import mu2net_pb2_grpc as pbgrpc
        from mu2net_client.client import classify_request

        request = classify_request(task, images, 1)

        @contextlib.asynccontextmanager
        async def client() -> Any:
            async with grpc.aio.insecure_channel(server.grpc,
                                                 options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
                yield pbgrpc.Mu2NetStub(channel)

        async def send(stub: Any) -> str:
            try:
                await stub.Classify(request, timeout=deadline)
                return "OK"
            except grpc.aio.AioRpcError as e:
                return str(e.code().name)
    else:
        import httpx

        url, body, params = _http_request(server, task, images)
        params["timeout_ms"] = str(max(1, round(deadline * 1000)))
        names = {200: "OK", 429: "RESOURCE_EXHAUSTED", 504: "DEADLINE_EXCEEDED", 503: "UNAVAILABLE"}

        def client() -> Any:
            limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
            return httpx.AsyncClient(limits=limits, timeout=deadline + 5)

        async def send(session: Any) -> str:
            try:
                r = await session.post(url, content=body, params=params, headers={"Content-Type": "application/json"})
            except httpx.HTTPError as e:
                return type(e).__name__
            return names.get(r.status_code, f"HTTP {r.status_code}")

    result = _open_loop(send, client, rate, seconds, max_in_flight)
    result["ok_images_per_second"] = round(result["ok_in_window"] * len(images) / seconds, 1)
    return result


def _http_request(server: RunningServer, task: str, images: np.ndarray) -> tuple[str, bytes, dict[str, str]]:
    """The HTTP classify of ``images`` as a raw uint8 tensor (JSON body): URL, body, query."""
    import base64
    import json

    body = json.dumps({"raw": {"shape": list(images.shape),
                               "data": base64.b64encode(images.tobytes()).decode()}}).encode()
    return f"{server.http}/v1/tasks/{task}/classify", body, {}


def http_throughput(server: RunningServer, task: str, images: np.ndarray, seconds: float, clients: int) -> float:
    """Images/s of HTTP classify from ``clients`` closed-loop threads (one httpx.Client each)."""
    import httpx

    url, body, _ = _http_request(server, task, images)

    @contextlib.contextmanager
    def session(i: int) -> Any:
        with httpx.Client(timeout=30) as c:
            yield lambda: c.post(url, content=body, headers={"Content-Type": "application/json"}).raise_for_status()

    return len(images) * closed_loop(session, clients, seconds)


def run_variant(data: str, flags: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One server on ``data`` with ``flags``: its capacity, then the overload, then capacity again."""
    server = RunningServer(data, ["--no-evolver", "--quiet", "--max-queued-images", str(args.max_queued_images),
                                  *flags])
    rss: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                rss.append(server.rss_bytes())
            except (OSError, RuntimeError):
                return
            stop.wait(0.5)

    try:
        images = np.random.default_rng(0).integers(0, 255, (args.batch, 28, 28, 1), dtype=np.uint8)
        def capacity_now(seconds: float) -> float:
            if args.protocol == "http":
                return http_throughput(server, "task00", images, seconds, args.clients)
            return grpc_throughput(server, "task00", images, seconds, args.clients, sdk=False)

        capacity = capacity_now(args.warm_seconds)
        rate = args.factor * capacity / args.batch
        print(f"[{' '.join(flags) or 'default'}] capacity {capacity:.0f} images/s; offering {rate:.0f} requests/s "
              f"({args.factor:g}x) for {args.seconds:g} s", flush=True)
        rss_start = server.rss_bytes()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = overload(server, "task00", images, rate, args.seconds, args.deadline, args.max_in_flight,
                          args.protocol)
        stop.set()
        sampler.join(5)
        alive = server.proc.poll() is None
        after = capacity_now(3.0) if alive else 0.0
        return {"flags": flags, "capacity_images_per_second": round(capacity, 1),
                "offered_requests_per_second": round(rate, 1), **result,
                "goodput_share_of_capacity": round(result["ok_images_per_second"] / capacity, 3),
                "rss_mb": {"start": round(rss_start / 2 ** 20, 1), "peak": round(max(rss) / 2 ** 20, 1),
                           "end": round(rss[-1] / 2 ** 20, 1),
                           "last_10s_growth": round((rss[-1] - rss[max(0, len(rss) - 21)]) / 2 ** 20, 1)},
                "queue_bound_mb": round(args.max_queued_images * 28 * 28 / 2 ** 20, 1),
                "server_alive": alive, "images_per_second_after": round(after, 1)}
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--factor", type=float, default=4.0, help="offered load over the measured capacity")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warm-seconds", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=16, help="images per request")
    ap.add_argument("--clients", type=int, default=4, help="closed-loop threads measuring capacity")
    ap.add_argument("--deadline", type=float, default=2.0,
                    help="deadline of each request (s): a gRPC deadline, or HTTP's timeout_ms")
    ap.add_argument("--max-in-flight", type=int, default=2000)
    ap.add_argument("--max-queued-images", type=int, default=16384)
    ap.add_argument("--protocol", choices=["grpc", "http"], default="grpc",
                    help="gRPC Classify, or HTTP POST /v1/tasks/{name}/classify (raw tensor JSON, ?timeout_ms=)")
    ap.add_argument("--compare", action="store_true",
                    help="also run the same load against a server with --no-deadline-admission, one after the "
                         "other on the same store, and report the goodput ratio")
    args = ap.parse_args()
    for name in ("factor", "seconds", "warm_seconds", "deadline"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    from mu2net import components as C

    config = C.ViTConfig(image_size=28, patch_size=7, width=64, mlp_dim=128, num_heads=4)
    arch, params = R.random_root(config, num_blocks=3, seed=0)
    data = tempfile.mkdtemp(prefix="mu2net-overload-") + "/store"
    make_store(data, arch, list(params), 1).close()
    out: dict[str, Any] = {"config": vars(args), **run_variant(data, [], args)}
    if args.compare:
        off = run_variant(data, ["--no-deadline-admission"], args)
        out["without_deadline_admission"] = off
        out["goodput_ratio_over_without"] = round(out["ok_images_per_second"] / max(off["ok_images_per_second"], 1e-9), 2)
    write_json(out, args.out)


if __name__ == "__main__":
    main()

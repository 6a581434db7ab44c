"""Overload: a real ``mu2net serve`` offered several times the traffic it can compute.

1. Capacity: closed-loop gRPC Classify throughput (``--clients`` threads, ``--batch``
   images per request, raw uint8 tensors) for ``--warm-seconds``.
2. Overload: an open-loop client (grpc.aio) sends requests at ``--factor`` x that rate for
   ``--seconds``, whatever the answers, each with a ``--deadline`` gRPC deadline, and at
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

With ``--compare`` the same load then runs against a second server on the same store with
``--no-deadline-admission`` (requests queue until the queue bound even when they would
expire unrun), and the goodput ratio of the two is reported.

The run needs the machine to itself (it measures throughput and latency).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from typing import Any

import numpy as np

from mu2net import root as R
from mu2net.server.launcher import RunningServer
from report import write_json
from serving import grpc_throughput, make_store


def overload(server: RunningServer, task: str, images: np.ndarray, rate: float, seconds: float,
             deadline: float, max_in_flight: int) -> dict[str, Any]:
    """Open-loop load at ``rate`` requests/s for ``seconds``; see the module docstring."""
    import grpc

    from mu2net_client._proto import mu2net_pb2_grpc as pbgrpc
    from mu2net_client.client import classify_request

    request = classify_request(task, images, 1)
    codes: dict[str, int] = {}
    latencies: list[float] = []
    not_sent = 0

    async def one(stub: Any) -> None:
        t0 = time.perf_counter()
        try:
            await stub.Classify(request, timeout=deadline)
            latencies.append(time.perf_counter() - t0)
            codes["OK"] = codes.get("OK", 0) + 1
        except grpc.aio.AioRpcError as e:
            codes[e.code().name] = codes.get(e.code().name, 0) + 1

    async def main() -> None:
        nonlocal not_sent
        async with grpc.aio.insecure_channel(server.grpc, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = pbgrpc.Mu2NetStub(ch)
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
                    task_ = asyncio.ensure_future(one(stub))
                    pending.add(task_)
                    task_.add_done_callback(pending.discard)
                await asyncio.sleep(0.001)
            if pending:
                await asyncio.wait(pending)

    asyncio.run(main())
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    sent = sum(codes.values())
    return {"offered_requests": sent + not_sent, "sent": sent, "not_sent_client_bound": not_sent,
            "codes": codes, "refused_share": round(codes.get("RESOURCE_EXHAUSTED", 0) / max(1, sent), 3),
            "admitted_p50_ms": round(float(np.percentile(lat, 50)), 1),
            "admitted_p99_ms": round(float(np.percentile(lat, 99)), 1),
            "ok_images_per_second": round(codes.get("OK", 0) * len(images) / seconds, 1)}


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
        capacity = grpc_throughput(server, "task00", images, args.warm_seconds, args.clients, sdk=False)
        rate = args.factor * capacity / args.batch
        print(f"[{' '.join(flags) or 'default'}] capacity {capacity:.0f} images/s; offering {rate:.0f} requests/s "
              f"({args.factor:g}x) for {args.seconds:g} s", flush=True)
        rss_start = server.rss_bytes()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = overload(server, "task00", images, rate, args.seconds, args.deadline, args.max_in_flight)
        stop.set()
        sampler.join(5)
        alive = server.proc.poll() is None
        after = grpc_throughput(server, "task00", images, 3.0, args.clients, sdk=False) if alive else 0.0
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
    ap.add_argument("--deadline", type=float, default=2.0, help="gRPC deadline of each request (s)")
    ap.add_argument("--max-in-flight", type=int, default=2000)
    ap.add_argument("--max-queued-images", type=int, default=16384)
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

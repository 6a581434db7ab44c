"""Cross-task batching (issue 19): many tasks at a low rate each, served as one busy task.

Side by side in one run, for a layer pool of the served ViT family (28x28 images, patch 7,
width 64, 3 blocks):

1. *shared*: 50 published tasks whose paths share every component but the head (as mu2Net
   paths do); one image per request, tasks drawn uniformly. Saturation throughput of the
   batcher with cross-task batching, without it (per-path batching, as before), and with
   the same total traffic sent to one task. In process: the server's Batcher and
   SnapshotManager, requests from asyncio tasks in the same process (no gRPC; the
   process's CPU use per mode is recorded). Per-path batching is measured with the
   server's default 2 ms batching delay and with none.
2. The same through gRPC: a real ``mu2net serve`` with and without
   ``--no-cross-task-batching``; a grpc.aio client on the same 2 cores keeps 128
   requests in flight, as 128 unary Classify calls, and over 4 ClassifyStream calls (32
   outstanding requests each). Per-call gRPC and Python work (server and client) bounds
   the unary figures more than the forward pass does; a stream pays the call's part once.
3. *separate*: 50 tasks whose paths share nothing (each its own random trunk): grouping
   must not cost anything (it cannot group them).
4. *evolved*: the tasks of an evolved store (``--evolved-store``, e.g. the main job's
   store after a quality run), with and without grouping.
5. Latency p50 / p99 of the shared pool at half the per-path saturation rate (open loop),
   with and without grouping.

    python benchmarks/cross_task.py --out docs/cross_task.json [--evolved-store DIR]
    python benchmarks/cross_task.py --grpc-only --out docs/cross_task_grpc.json    # (2) alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import make_store  # noqa: E402  (50 tasks sharing everything but the head)

from mu2net import components as C  # noqa: E402
from mu2net import paths as P  # noqa: E402
from mu2net import root as R  # noqa: E402
from mu2net.evolver.loop import _digest  # noqa: E402
from mu2net.ingest import add_task_arrays  # noqa: E402
from mu2net.root import init_root  # noqa: E402
from mu2net.server.batcher import Batcher  # noqa: E402
from mu2net.server.launcher import RunningServer  # noqa: E402
from mu2net.server.snapshot import SnapshotManager  # noqa: E402
from mu2net.store import ComponentRecord, Store, new_id  # noqa: E402


def separate_store(path: str, config: C.ViTConfig, blocks: int, n_tasks: int) -> None:
    """A store whose ``n_tasks`` tasks share no component (each path its own random ViT)."""
    store = Store(path)
    arch, params = R.random_root(config, blocks, seed=0, num_classes=10)
    init_root(store, arch, params)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (200, 28, 28, 1), dtype=np.uint8)
    for t in range(n_tasks):
        name = f"task{t:02d}"
        add_task_arrays(store, name, {"train": (x, rng.integers(0, 10, 200))}, [str(i) for i in range(10)],
                        source="benchmark")
        _, own = R.random_root(config, blocks, seed=100 + t, num_classes=10)
        own[-1] = jax.tree_util.tree_map(lambda a: a + rng.normal(0, 0.01, a.shape).astype(np.float32), own[-1])
        records = []
        for kind, p in zip(arch.kinds, own):
            pd, od = store.write_component_files(p, None)
            records.append(ComponentRecord(id=_digest(p), kind=kind, params_digest=pd, opt_digest=od, parent_id=None,
                                           task=name, acl_group=None, steps={name: 1}, num_params=C.num_params(p),
                                           num_classes=10 if kind == C.HEAD else 0))
        path = P.Path(id=new_id(), task=name, component_ids=tuple(r.id for r in records), architecture=arch,
                      hparams=dict(store.root_path().hparams), score=0.5, parent_id=None, metrics={})
        store.publish(path, records, task=name, iteration_done=True)
    store.close()


def snapshot_of(data: str, cross_task: bool) -> Any:
    store = Store(data)
    manager = SnapshotManager(store, 64, cross_task=cross_task)
    manager.refresh()
    return store, manager.snapshot


async def _closed_loop(batcher: Batcher, snapshot: Any, tasks: list[str], seconds: float, concurrency: int,
                       seed: int) -> float:
    """Images/s with ``concurrency`` requests always outstanding, one image each, tasks drawn uniformly."""
    rng = np.random.default_rng(seed)
    images = {t: rng.integers(0, 255, (1, *snapshot.paths[t].task.image_shape), dtype=np.uint8) for t in tasks}
    done = [0]
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        r = np.random.default_rng([seed, i])
        while time.perf_counter() < stop:
            t = tasks[int(r.integers(len(tasks)))]
            await batcher.predict(snapshot.paths[t], images[t], snapshot_version=snapshot.version)
            done[0] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return done[0] / (time.perf_counter() - t0)


async def _open_loop(batcher: Batcher, snapshot: Any, tasks: list[str], rate: float, seconds: float,
                     seed: int) -> dict[str, float]:
    """Latency of one-image requests offered at ``rate`` per second (Poisson arrivals)."""
    rng = np.random.default_rng(seed)
    images = {t: rng.integers(0, 255, (1, *snapshot.paths[t].task.image_shape), dtype=np.uint8) for t in tasks}
    latencies: list[float] = []

    async def one(t: str) -> None:
        t0 = time.perf_counter()
        await batcher.predict(snapshot.paths[t], images[t], snapshot_version=snapshot.version)
        latencies.append(time.perf_counter() - t0)

    pending = []
    stop = time.perf_counter() + seconds
    nxt = time.perf_counter()
    while nxt < stop:
        nxt += float(rng.exponential(1.0 / rate))
        await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
        pending.append(asyncio.ensure_future(one(tasks[int(rng.integers(len(tasks)))])))
    await asyncio.gather(*pending)
    ms = np.array(latencies) * 1000
    return {"offered_per_s": rate, "requests": len(ms), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


#: in-process modes: (cross-task batching, the batcher's max delay in ms, one task only)
MODES = {"grouped": (True, 2.0, False), "per_path": (False, 2.0, False),
         "per_path_no_delay": (False, 0.0, False), "one_task": (True, 2.0, True)}


def in_process(data: str, seconds: float, concurrency: int, rounds: int, one_task: bool = True) -> dict[str, Any]:
    """Saturation images/s of the batcher, rounds alternated: cross-task batching; per-path
    batching with the server's default 2 ms delay and with none (a per-path batch of these
    requests rarely fills, so with a delay it waits the whole delay); and (``one_task``) the
    same traffic to one task. Also this process's CPU use per mode (cores, of 2)."""
    out: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    stores = []
    try:
        snaps = {}
        for mode, cross in (("grouped", True), ("per_path", False)):
            store, snaps[mode] = snapshot_of(data, cross)
            stores.append(store)
        tasks = sorted(snaps["grouped"].paths)
        for r in range(rounds):
            for mode, (cross, delay, single) in MODES.items():
                if single and not one_task:
                    continue
                batcher = Batcher(64, delay, cross_task=cross)
                try:
                    chosen = tasks[:1] if single else tasks
                    snap = snaps["grouped" if cross else "per_path"]
                    asyncio.run(_closed_loop(batcher, snap, chosen, 1.0, concurrency, seed=r))  # warm
                    t0, c0 = time.perf_counter(), os.times()
                    out[mode].append(asyncio.run(_closed_loop(batcher, snap, chosen, seconds, concurrency, seed=r)))
                    c1 = os.times()
                    cpu[mode].append((c1.user - c0.user + c1.system - c0.system) / (time.perf_counter() - t0))
                finally:
                    batcher.close()
    finally:
        for s in stores:
            s.close()
    med = {k: float(np.median(v)) for k, v in out.items() if v}
    result: dict[str, Any] = {"tasks": len(tasks), "images_per_s": med, "rounds": out,
                              "process_cpu_cores": {k: float(np.median(v)) for k, v in cpu.items() if v}}
    result["grouped_over_per_path"] = med["grouped"] / med["per_path"]
    result["grouped_over_per_path_no_delay"] = med["grouped"] / med["per_path_no_delay"]
    if "one_task" in med:
        result["grouped_over_one_task"] = med["grouped"] / med["one_task"]
    return result


def latency(data: str, rate: float, seconds: float) -> dict[str, Any]:
    out = {}
    for mode, cross in (("grouped", True), ("per_path", False)):
        store, snap = snapshot_of(data, cross)
        batcher = Batcher(64, 2.0, cross_task=cross)
        try:
            tasks = sorted(snap.paths)
            asyncio.run(_closed_loop(batcher, snap, tasks, 1.0, 64, seed=0))  # warm
            out[mode] = asyncio.run(_open_loop(batcher, snap, tasks, rate, seconds, seed=1))
        finally:
            batcher.close()
            store.close()
    return out


def through_grpc(data: str, seconds: float, in_flight: int, streams: int = 4) -> dict[str, Any]:
    """gRPC images/s, one image per request, tasks drawn uniformly (and all to one task):
    unary Classify calls (``in_flight`` outstanding), and ClassifyStream (``streams`` calls,
    each keeping ``in_flight // streams`` requests outstanding)."""
    import grpc

    from mu2net_client._proto import mu2net_pb2 as pb
    from mu2net_client._proto import mu2net_pb2_grpc as pbgrpc

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (1, 28, 28, 1), dtype=np.uint8).tobytes()

    def requests_of(tasks: list[str]) -> list[Any]:
        return [pb.ClassifyRequest(task=t, raw=pb.RawTensor(shape=[1, 28, 28, 1], data=x)) for t in tasks]

    async def load(target: str, tasks: list[str], secs: float) -> float:
        requests = requests_of(tasks)
        done = [0]
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pbgrpc.Mu2NetStub(ch)
            stop = time.perf_counter() + secs

            async def client(i: int) -> None:
                r = np.random.default_rng(i)
                while time.perf_counter() < stop:
                    await stub.Classify(requests[int(r.integers(len(requests)))], timeout=30)
                    done[0] += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(in_flight)))
            return done[0] / (time.perf_counter() - t0)

    async def load_stream(target: str, tasks: list[str], secs: float) -> float:
        requests = requests_of(tasks)
        done, failed = [0], [0]
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pbgrpc.Mu2NetStub(ch)
            stop = time.perf_counter() + secs

            async def one_stream(i: int) -> None:
                r = np.random.default_rng(i)
                window = asyncio.Semaphore(max(1, in_flight // streams))

                async def send() -> Any:
                    while time.perf_counter() < stop:
                        await window.acquire()
                        yield requests[int(r.integers(len(requests)))]

                async for answer in stub.ClassifyStream(send(), timeout=secs + 60):
                    window.release()
                    if answer.error_code:
                        failed[0] += 1
                    else:
                        done[0] += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(one_stream(i) for i in range(streams)))
            if failed[0]:
                raise RuntimeError(f"{failed[0]} ClassifyStream requests failed")
            return done[0] / (time.perf_counter() - t0)

    out: dict[str, Any] = {}
    for mode, flags in (("grouped", []), ("per_path", ["--no-cross-task-batching"])):
        server = RunningServer(data, ["--no-evolver", "--max-batch-size", "64", *flags])
        try:
            import httpx

            tasks = [t["name"] for t in httpx.get(server.http + "/v1/tasks").json()["tasks"]]
            asyncio.run(load(server.grpc, tasks, 2.0))  # warm
            asyncio.run(load_stream(server.grpc, tasks, 2.0))
            for kind, fn in (("", load), ("_stream", load_stream)):
                cpu0, wall0 = os.times(), time.perf_counter()
                out[mode + kind] = fn_out = asyncio.run(fn(server.grpc, tasks, seconds))
                cpu1, wall = os.times(), time.perf_counter() - wall0  # (a stream's drain after the stop too)
                out[f"{mode}{kind}_client_cpu_share"] = ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall
                print(f"  gRPC {mode}{kind}: {fn_out:.0f} images/s", flush=True)
                if mode == "grouped":
                    out["one_task" + kind] = asyncio.run(fn(server.grpc, tasks[:1], seconds))
        finally:
            server.stop()
    for kind in ("", "_stream"):
        out[f"grouped_over_per_path{kind}"] = out["grouped" + kind] / out["per_path" + kind]
        out[f"grouped_over_one_task{kind}"] = out["grouped" + kind] / out["one_task" + kind]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per measured configuration")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds of the in-process measurements")
    ap.add_argument("--concurrency", type=int, default=256, help="requests kept outstanding (closed loop)")
    ap.add_argument("--evolved-store", default=None, help="an evolved store to measure as it is (read only)")
    ap.add_argument("--no-grpc", action="store_true", help="skip the end-to-end gRPC measurement")
    ap.add_argument("--grpc-only", action="store_true", help="only the end-to-end gRPC measurement (2)")
    args = ap.parse_args()
    config = C.ViTConfig(28, 7, 64, 128, 4)
    arch, params = R.random_root(config, 3, seed=0, num_classes=10)
    out: dict[str, Any] = {"config": vars(args)}
    with tempfile.TemporaryDirectory() as shared, tempfile.TemporaryDirectory() as separate:
        make_store(shared, arch, params, args.tasks).close()
        if args.grpc_only:
            out["shared_grpc"] = through_grpc(shared, args.seconds, 128)
            print(json.dumps(out["shared_grpc"], indent=1))
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=1, default=str)
            return
        out["shared"] = in_process(shared, args.seconds, args.concurrency, args.rounds)
        print("shared (in process):", json.dumps(out["shared"]["images_per_s"]), flush=True)
        rate = 0.5 * out["shared"]["images_per_s"]["per_path"]
        out["latency_at_half_per_path_saturation"] = latency(shared, rate, max(args.seconds, 5.0))
        print("latency:", json.dumps(out["latency_at_half_per_path_saturation"]), flush=True)
        if not args.no_grpc:
            try:
                out["shared_grpc"] = through_grpc(shared, args.seconds, 128)
            except Exception as e:  # the in-process figures stand without it
                out["shared_grpc"] = {"error": repr(e)}
            print("shared (gRPC):", json.dumps(out["shared_grpc"]), flush=True)
        separate_store(separate, config, 3, args.tasks)
        out["separate"] = in_process(separate, args.seconds, args.concurrency, args.rounds, one_task=False)
        print("separate (in process):", json.dumps(out["separate"]["images_per_s"]), flush=True)
    if args.evolved_store:
        with tempfile.TemporaryDirectory() as copy:  # the store is read through a copy: never written
            import shutil

            shutil.copytree(args.evolved_store, copy, dirs_exist_ok=True)
            out["evolved"] = in_process(copy, args.seconds, args.concurrency, args.rounds, one_task=False)
            store = Store(copy)
            paths = [store.best_path(t.name) for t in store.list_tasks()]
            out["evolved"]["paths"] = {p.task: list(p.component_ids) for p in paths if p is not None}
            store.close()
        print("evolved (in process):", json.dumps(out["evolved"]["images_per_s"]), flush=True)
    print(json.dumps({k: v for k, v in out.items() if k != "config"}, indent=1, default=str))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()

"""Serving benchmarks, each measured side by side in one run.

1. Routed forward (the server's ServedPath: per-component params through the shared
   forward function) against a plain jitted Flax forward of the same architecture (one
   module, one parameter tree), at the same batch sizes.
2. End-to-end gRPC Classify throughput (real server subprocess, raw uint8 tensors,
   concurrent clients) against the in-process routed forward at batch 64.
3. Sparse activation: a server with 50 published tasks (sharing the embeddings and
   blocks, each with its own head, as mu2Net paths do) against one with 1 task:
   per-task throughput and server memory (RSS) against the added unique parameters.
4. Hot-swap: time from a publish to the first answer from the new version, and classify
   latency p50/p99 during swaps against steady state.
5. XLA's CPU compute pool: the in-process forward at batch 64 in fresh processes whose
   pool has one thread against JAX's default (one per CPU), rounds alternated: images/s
   and CPU time per image (why ``mu2net serve`` leaves a core to its own threads).

    python benchmarks/serving.py --out docs/serving.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, ContextManager, Iterator

import flax.linen as nn
import jax
import numpy as np

from mu2net import components as C
from mu2net import paths as P
from mu2net import root as R
from mu2net.root import init_root
from mu2net.ingest import add_task_arrays
from mu2net.evolver.loop import _digest
from mu2net.server.compute import available_cpus, default_compute_threads, limit_compute_threads
from mu2net.server.launcher import RunningServer
from mu2net.server.snapshot import ServedPath
from mu2net.store import ComponentRecord, Store, new_id


class PlainViT(nn.Module):
    """The same ViT as one Flax module (the baseline of benchmark 1)."""

    arch: P.Architecture

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = P.preprocess(images, self.arch.config.image_size)
        for i, kind in enumerate(self.arch.kinds):
            x = C.module(kind, self.arch.config, self.arch.num_classes).copy(name=f"c{i}")(x)
        return x


def throughput(fn: Callable[[], Any], seconds: float) -> float:
    """Calls per second of ``fn`` (after one warm-up call) over about ``seconds``."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def interleaved_call_times(fns: dict[str, Callable[[], Any]], seconds: float) -> dict[str, list[float]]:
    """Per-call wall times (s) of each function, calls interleaved A, B, A, B, ... for ``seconds``.

    Interleaving single calls exposes both functions to the same machine state (other
    processes, clock, caches), so the ratio of the median call times resolves a few
    percent where back-to-back timed loops on a shared 2-core machine drift by ±10%.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def _normalised_hlo(fn: Any, params: Any, images: np.ndarray) -> list[str]:
    """The optimized XLA program of ``fn(params, images)`` without names and source metadata."""
    out = []
    for line in fn.lower(params, images).compile().as_text().splitlines():
        line = line.strip()
        if line.startswith("ENTRY"):
            line = "ENTRY"  # parameter names differ (a dict tree vs a tuple of components)
        line = re.sub(r", metadata=\{[^}]*\}", "", line)
        line = re.sub(r"%[\w.\-]+", "%v", line)
        if line and not line.startswith(("HloModule", "FileNames", "FunctionNames", "FileLocations",
                                          "StackFrames")) and not re.match(r"^\d+ ", line):
            out.append(line)
    return sorted(out)


def make_store(path: str, arch: P.Architecture, params: list, n_tasks: int, seed: int = 0) -> Store:
    """A store whose ``n_tasks`` tasks share every component but the head (published directly)."""
    store = Store(path)
    init_root(store, arch, params)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 255, (200, arch.config.image_size, arch.config.image_size, 1), dtype=np.uint8)
    root = store.root_path()
    for t in range(n_tasks):
        name = f"task{t:02d}"
        add_task_arrays(store, name, {"train": (x, rng.integers(0, 10, 200))}, [str(i) for i in range(10)],
                        source="benchmark")
        head = jax.device_get(C.init_component(C.HEAD, arch.config, jax.random.PRNGKey(1000 + t), 10))
        head = jax.tree_util.tree_map(lambda a: a + rng.normal(0, 0.01, a.shape).astype(np.float32), head)
        pd, od = store.write_component_files(head, None)
        rec = ComponentRecord(id=_digest(head), kind=C.HEAD, params_digest=pd, opt_digest=od, parent_id=None,
                              task=name, acl_group=None, steps={name: 1}, num_params=C.num_params(head),
                              num_classes=10)
        path = P.Path(id=new_id(), task=name, component_ids=root.component_ids[:-1] + (rec.id,),
                      architecture=P.Architecture(arch.config, arch.kinds, 10), hparams=dict(root.hparams),
                      score=0.5, parent_id=root.id, metrics={})
        store.publish(path, [rec], task=name, iteration_done=True)
    return store


def publish_new_head(store: Store, task: str, config: C.ViTConfig, seed: int) -> int:
    """Publishes the task's served path with a newly initialised head (PRNG key ``seed``);
    every other component stays shared. Returns the system version of the publish."""
    old = store.best_path(task)
    head = jax.device_get(C.init_component(C.HEAD, config, jax.random.PRNGKey(seed), old.architecture.num_classes))
    pd, od = store.write_component_files(head, None)
    rec = ComponentRecord(id=_digest(head), kind=C.HEAD, params_digest=pd, opt_digest=od, parent_id=None,
                          task=task, acl_group=None, steps={task: 1}, num_params=C.num_params(head),
                          num_classes=old.architecture.num_classes)
    new = P.Path(id=new_id(), task=task, component_ids=old.component_ids[:-1] + (rec.id,),
                 architecture=old.architecture, hparams=dict(old.hparams), score=0.5, parent_id=old.id, metrics={})
    return store.publish(new, [rec], task=task, iteration_done=True)


def grpc_throughput(server: RunningServer, task: str, images: np.ndarray, seconds: float, clients: int,
                    sdk: bool = True) -> float:
    """Images/s of Classify from ``clients`` threads: through the SDK (typed results) or, with
    ``sdk=False``, the bare generated stub (the server's cost with the least client work)."""
    import grpc

    from mu2net_client import Client
    from mu2net_client._proto import mu2net_pb2_grpc
    from mu2net_client.client import classify_request

    @contextlib.contextmanager
    def session(i: int) -> Iterator[Callable[[], Any]]:
        if sdk:
            with Client(server.grpc, server.http) as c:
                yield lambda: c.classify(task, images)
            return
        request = classify_request(task, images, 1)
        with grpc.insecure_channel(server.grpc) as channel:
            stub = mu2net_pb2_grpc.Mu2NetStub(channel)
            yield lambda: stub.Classify(request)

    return len(images) * closed_loop(session, clients, seconds)


def closed_loop(session: Callable[[int], ContextManager[Callable[[], Any]]], clients: int, seconds: float) -> float:
    """Calls per second from ``clients`` threads, each calling as fast as it gets answers.

    Thread ``i`` opens ``session(i)`` (a context manager giving the call), makes one untimed
    warm-up call, and waits for every other thread; then all call for ``seconds``. The rate
    is the calls started in that window over the seconds from its start until the last of
    them is answered (sessions' teardown not included). An error in any thread stops the
    others at their next call and is raised."""
    if clients < 1:
        raise ValueError(f"clients={clients}; allowed: 1 or more")
    counts = [0] * clients
    ends = [0.0] * clients
    window: dict[str, float] = {}
    errors: list[BaseException] = []
    failed = threading.Event()
    barrier = threading.Barrier(clients, action=lambda: window.__setitem__("start", time.perf_counter()))

    def run(i: int) -> None:
        try:
            with session(i) as call:
                call()
                barrier.wait()
                stop = window["start"] + seconds
                while time.perf_counter() < stop and not failed.is_set():
                    call()
                    counts[i] += 1
                ends[i] = time.perf_counter()
        except threading.BrokenBarrierError:
            pass  # another thread failed: its error is raised
        except BaseException as e:
            errors.append(e)
            failed.set()
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts) / (max(ends) - window["start"])


def latency_run(server: RunningServer, task: str, images: np.ndarray, seconds: float,
                during: Callable[[], None] | None = None) -> dict[str, float]:
    from mu2net_client import Client

    lat: list[float] = []
    stop = threading.Event()

    def run() -> None:
        with Client(server.grpc, server.http) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                c.classify(task, images)
                lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    if during is not None:
        during()
    else:
        time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    arr = np.array(lat) * 1000
    return {"requests": len(arr), "p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99))}


def compute_pool_probe(threads: int, width: int, blocks: int, seconds: float) -> dict[str, float]:
    """Benchmark 5, run in a fresh process: the in-process forward at batch 64 with an XLA
    compute pool of ``threads`` (0: JAX's default), images/s and CPU microseconds per image."""
    pool = limit_compute_threads(threads)
    arch, params = R.random_root(C.ViTConfig(28, 7, width, 2 * width, 4), blocks, seed=0, num_classes=10)
    fn, dev_params = P.probabilities_fn(arch), jax.device_put(params)
    x64 = np.random.default_rng(0).integers(0, 255, (64, 28, 28, 1), dtype=np.uint8)
    np.asarray(fn(dev_params, x64))
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        np.asarray(fn(dev_params, x64))
        n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"pool_threads": pool, "images_per_s": 64 * n / wall, "cpu_us_per_image": 1e6 * cpu / (64 * n)}


def compute_pool_rounds(args: argparse.Namespace, rounds: int = 4) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for r in range(rounds):
        row = {}
        for threads in ((1, 0) if r % 2 == 0 else (0, 1)):
            proc = subprocess.run([sys.executable, __file__, "--probe-compute-threads", str(threads), "--width",
                                   str(args.width), "--blocks", str(args.blocks), "--seconds", str(args.seconds / 2)],
                                  capture_output=True, text=True, check=True)
            row["one_thread" if threads == 1 else "default"] = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
    med = {k: {m: float(np.median([r[k][m] for r in rows])) for m in ("images_per_s", "cpu_us_per_image")}
           for k in ("one_thread", "default")}
    return {"cpus": available_cpus(), "rounds": rows, "median": med,
            "throughput_ratio_one_thread_vs_default": float(np.median(
                [r["one_thread"]["images_per_s"] / r["default"]["images_per_s"] for r in rows]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/serving.json")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per measured configuration")
    ap.add_argument("--clients", type=int, default=2, help="concurrent client threads of benchmarks 2 and 3")
    ap.add_argument("--e2e-rounds", type=int, default=8, help="alternating rounds of benchmarks 2 and 3")
    ap.add_argument("--only-routed", action="store_true", help="run benchmark 1 only")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--swaps", type=int, default=5)
    ap.add_argument("--server-compute-threads", type=int, default=None,
                    help="--compute-threads of the benchmarked servers (default: the server's default)")
    ap.add_argument("--probe-compute-threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe_compute_threads is not None:  # benchmark 5's child process
        print(json.dumps(compute_pool_probe(args.probe_compute_threads, args.width, args.blocks, args.seconds)))
        return
    server_args = ["--no-evolver", "--max-batch-size", "64"]
    if args.server_compute_threads is not None:
        server_args += ["--compute-threads", str(args.server_compute_threads)]
    out: dict[str, Any] = {"config": vars(args), "devices": [str(d) for d in jax.devices()],
                           "server_compute_threads": default_compute_threads() if args.server_compute_threads is None
                           else args.server_compute_threads}
    config = C.ViTConfig(28, 7, args.width, 2 * args.width, 4)
    arch, params = R.random_root(config, args.blocks, seed=0, num_classes=10)
    rng = np.random.default_rng(0)

    # 1. routed vs plain forward
    plain = PlainViT(arch)
    x1 = rng.integers(0, 255, (1, 28, 28, 1), dtype=np.uint8)
    plain_params = plain.init(jax.random.PRNGKey(0), x1)
    plain_fn = jax.jit(lambda p, x: jax.nn.softmax(plain.apply(p, x), axis=-1))
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(tmp, arch, params, 1)
        task = store.get_task("task00")
        path = store.best_path("task00")
        served = ServedPath(task=task, path=path, params=tuple(jax.device_put(store.load_params(path.component_ids))),
                            version=store.system_version())
        rows = []
        same_hlo = _normalised_hlo(plain_fn, plain_params, x1) == _normalised_hlo(
            P.probabilities_fn(arch), served.params, x1)
        for b in (1, 8, 64):
            xb = rng.integers(0, 255, (b, 28, 28, 1), dtype=np.uint8)
            fns = {"plain": lambda: np.asarray(plain_fn(plain_params, xb)), "routed": lambda: served.predict(xb)}
            times = interleaved_call_times(fns, args.seconds)
            med = {k: float(np.median(v)) for k, v in times.items()}
            rows.append({"batch": b, "routed_images_per_s": b / med["routed"], "plain_images_per_s": b / med["plain"],
                         "ratio": med["plain"] / med["routed"], "calls_each": len(times["plain"]),
                         "same_optimized_hlo": same_hlo})
        out["routed_vs_plain"] = rows
        print(json.dumps(rows, indent=1))
        x64 = rng.integers(0, 255, (64, 28, 28, 1), dtype=np.uint8)
        store.close()
    if args.only_routed:
        return

    # 2 + 3: one task vs 50 tasks, end-to-end gRPC; both servers up, rounds alternated
    results: dict[int, dict[str, Any]] = {}
    servers: dict[int, RunningServer] = {}
    tmps = {n: tempfile.TemporaryDirectory() for n in (1, 50)}
    e2e_rounds: list[dict[str, float]] = []
    try:
        import httpx

        for n_tasks in (1, 50):
            store = make_store(tmps[n_tasks].name, arch, params, n_tasks)
            unique = sum(c.num_params for c in store.list_components())
            store.close()
            servers[n_tasks] = RunningServer(tmps[n_tasks].name, server_args)
            system = httpx.get(servers[n_tasks].http + "/v1/system").json()
            results[n_tasks] = {"unique_params": unique, "rss_bytes": servers[n_tasks].rss_bytes(),
                                "loaded_param_bytes": system["loaded_param_bytes"],
                                "live_array_bytes": system["live_array_bytes"], "rounds": []}
        with tempfile.TemporaryDirectory() as tmp2:
            s2 = make_store(tmp2, arch, params, 1)
            p2 = s2.best_path("task00")
            served = ServedPath(task=s2.get_task("task00"), path=p2,
                                params=tuple(jax.device_put(s2.load_params(p2.component_ids))),
                                version=s2.system_version())
            s2.close()
        measures: dict[str, Callable[[], float]] = {
            "fifty_tasks": lambda: grpc_throughput(servers[50], "task00", x64, args.seconds / 4, args.clients),
            "inprocess": lambda: throughput(lambda: served.predict(x64), args.seconds / 4) * 64,
            "grpc_sdk": lambda: grpc_throughput(servers[1], "task00", x64, args.seconds / 4, args.clients),
            "grpc_stub": lambda: grpc_throughput(servers[1], "task00", x64, args.seconds / 4, args.clients, sdk=False)}
        names = list(measures)
        for r in range(args.e2e_rounds):  # short rounds, order rotated each round; ratios taken per round
            order = names[r % len(names):] + names[:r % len(names)]
            row = {k: measures[k]() for k in order}
            e2e_rounds.append(row)
            results[1]["rounds"].append(row["grpc_sdk"])  # the 1-task server's SDK throughput
            results[50]["rounds"].append(row["fifty_tasks"])
        results[50]["last_task_images_per_s"] = grpc_throughput(servers[50], "task49", x64, args.seconds / 2, args.clients)
        for n_tasks in (1, 50):
            results[n_tasks]["grpc_images_per_s"] = float(np.median(results[n_tasks]["rounds"]))
    finally:
        for server in servers.values():
            server.stop()
        for t in tmps.values():
            t.cleanup()
    med = {k: float(np.median([r[k] for r in e2e_rounds])) for k in e2e_rounds[0]}

    def ratio(a: str, b: str) -> float:
        return float(np.median([r[a] / r[b] for r in e2e_rounds]))

    out["e2e_grpc_vs_inprocess_batch64"] = {
        "rounds": e2e_rounds, "inprocess_images_per_s": med["inprocess"],
        "grpc_sdk_images_per_s": med["grpc_sdk"], "grpc_stub_images_per_s": med["grpc_stub"],
        "ratio_sdk": ratio("grpc_sdk", "inprocess"), "ratio_stub": ratio("grpc_stub", "inprocess")}
    added = results[50]["unique_params"] - results[1]["unique_params"]
    out["sparse_activation"] = {
        "one_task": results[1], "fifty_tasks": results[50],
        "throughput_ratio": ratio("fifty_tasks", "grpc_sdk"),
        "added_unique_params": added, "added_unique_param_bytes": added * 4,
        "rss_growth_bytes": results[50]["rss_bytes"] - results[1]["rss_bytes"],
        "live_array_growth_bytes": results[50]["live_array_bytes"] - results[1]["live_array_bytes"],
        "loaded_param_growth_bytes": results[50]["loaded_param_bytes"] - results[1]["loaded_param_bytes"]}
    print(json.dumps(out["e2e_grpc_vs_inprocess_batch64"], indent=1))
    print(json.dumps(out["sparse_activation"], indent=1))

    # 4. hot-swap
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(tmp, arch, params, 1)
        server = RunningServer(tmp, server_args)
        x8 = x64[:8]
        try:
            steady = latency_run(server, "task00", x8, args.seconds)
            swap_times: list[float] = []

            def swaps() -> None:
                from mu2net_client import Client

                with Client(server.grpc, server.http) as c:
                    for i in range(args.swaps):
                        t0 = time.perf_counter()
                        version = publish_new_head(store, "task00", config, 5000 + i)
                        while c.classify("task00", x8[:1]).system_version != version:
                            time.sleep(0.005)
                        swap_times.append(time.perf_counter() - t0)
                        time.sleep(0.5)

            during = latency_run(server, "task00", x8, 0, during=swaps)
        finally:
            server.stop()
            store.close()
    out["hot_swap"] = {"publish_to_serving_s": {"p50": float(np.median(swap_times)), "max": float(max(swap_times))},
                       "steady": steady, "during_swaps": during}
    print(json.dumps(out["hot_swap"], indent=1))

    # 5. XLA compute pool: one thread vs JAX's default, in fresh processes
    out["compute_pool"] = compute_pool_rounds(args)
    print(json.dumps(out["compute_pool"]["median"], indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

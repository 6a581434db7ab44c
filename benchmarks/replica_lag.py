"""Replica swap lag: seconds from a publish on the evolver host's store to the first answer
from the new system version, for replicas reading a model repository against a server on
the store itself, side by side in one run (issue 18, docs/scale-out.md).

A store with one task (the serving benchmark's ViT: 28x28, patch 7, width 64, 4 blocks,
random weights; ``benchmarks/serving.py``'s ``make_store``) is exported to a repository by
this process as the evolver host's server does (``mu2net.repository.exporter`` polled
every 0.5 s). ``--replicas`` replica servers (``mu2net serve --no-evolver --repository
URL``) and one server on the store (``--no-evolver``) run as subprocesses. Each of
``--publishes`` publishes gives the served path a new head (the other components stay
shared, as most of the evolver's publishes do); after it, every server is asked over gRPC
until it answers from the new version. ``--url`` picks the repository (default a
temporary directory; an ``s3://`` URL reads its endpoint and credentials from fsspec's
environment, e.g. ``FSSPEC_S3_ENDPOINT_URL``); ``--s3`` starts an S3-compatible server
(moto's server mode, the test extra's ``moto[server]``) on 127.0.0.1 and uses a bucket on it.

    python benchmarks/replica_lag.py --out docs/replica_lag.json
    python benchmarks/replica_lag.py --s3 --out docs/replica_lag_s3.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from typing import Iterator

import numpy as np

from serving import make_store, publish_new_head

from mu2net import components as C
from mu2net import root as R
from mu2net.repository import Poller, Repository, exporter
from mu2net.server.launcher import RunningServer, s3_server
from mu2net_client import Client


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/replica_lag.json")
    ap.add_argument("--publishes", type=int, default=20)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--url", default=None, help="repository URL (default: a new temporary directory)")
    ap.add_argument("--s3", action="store_true", help="start an S3-compatible server (moto) and use a bucket on it")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between a version served everywhere and "
                                                                "the next publish")
    args = ap.parse_args()
    if args.publishes < 1 or args.replicas < 1:
        raise SystemExit("--publishes and --replicas must be >= 1")
    if args.s3 and args.url:
        raise SystemExit("--s3 makes its own repository URL; give --s3 or --url")
    with contextlib.ExitStack() as stack:
        options: dict[str, str] = {}
        if args.s3:
            args.url, options = stack.enter_context(_s3_bucket())
        _run(args, options)


@contextlib.contextmanager
def _s3_bucket() -> Iterator[tuple[str, dict[str, str]]]:
    """An S3-compatible server (:func:`mu2net.server.launcher.s3_server`); yields an
    ``s3://`` URL in its bucket and this process's storage options, with the environment
    that points the servers' fsspec at it set in ``os.environ`` (they inherit it)."""
    with s3_server() as (env, options):
        os.environ.update(env)
        yield "s3://mu2net/replica-lag", options


def _run(args: argparse.Namespace, options: dict[str, str]) -> None:
    config = C.ViTConfig(28, 7, 64, 128, 4)
    arch, params = R.random_root(config, 4, seed=0, num_classes=10)
    x = np.random.default_rng(0).integers(0, 255, (1, 28, 28, 1), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or os.path.join(tmp, "repository")
        store = make_store(os.path.join(tmp, "primary"), arch, params, 1)
        repo = Repository(url, **options)
        export = Poller("repository-export", exporter(store, repo), repository=repo).start()
        common = ["--max-batch-size", "8"]
        servers = {"same_store": RunningServer(os.path.join(tmp, "primary"), ["--no-evolver", *common])}
        for i in range(args.replicas):
            servers[f"replica{i}"] = RunningServer(os.path.join(tmp, f"replica{i}"),
                                                   ["--no-evolver", "--repository", url, *common])
        lags: dict[str, list[float]] = {name: [] for name in servers}
        clients = {name: Client(s.grpc, s.http, timeout=30) for name, s in servers.items()}
        try:
            for i in range(args.publishes):
                t0 = time.perf_counter()
                version = publish_new_head(store, "task00", config, 7000 + i)
                pending = set(servers)
                while pending:
                    for name in sorted(pending):
                        try:
                            answered = clients[name].classify("task00", x).system_version
                        except Exception:  # noqa: BLE001 - a replica before its first version
                            answered = -1
                        if answered >= version:
                            lags[name].append(time.perf_counter() - t0)
                            pending.discard(name)
                    if time.perf_counter() - t0 > 120:
                        raise SystemExit(f"publish {i} (version {version}) not served by {sorted(pending)} "
                                         f"after 120 s; export error: {export.last_error}")
                    time.sleep(0.01)
                print(f"publish {i + 1}/{args.publishes} (version {version}): "
                      + ", ".join(f"{n} {lags[n][-1]:.2f}s" for n in servers), flush=True)
                time.sleep(args.interval)
        finally:
            for c in clients.values():
                c.close()
            for s in servers.values():
                s.stop()
            export.stop()
            store.close()
    out = {"config": vars(args), "repository": "temporary directory" if args.url is None else
           (f"{args.url} on moto's S3-compatible server" if args.s3 else args.url),
           "export_poll_seconds": export.poll_seconds,
           "publish_to_served_s": {n: {"p50": float(np.median(v)), "max": float(max(v)), "all": v}
                                   for n, v in lags.items()}}
    print(json.dumps({n: {k: round(v[k], 3) for k in ("p50", "max")} for n, v in out["publish_to_served_s"].items()},
                     indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

"""Children per minute on a Ray cluster (1 and 2 nodes of 1 CPU each) against the in-process
evolver on 2 local CPU devices, and the bytes Ray moves per child and per phase.

Each setting is a fresh process running the real evolver on the same store: the quality
benchmark's root (random, no blocks; 28x28, patch 7, width 64) and a built-in task (default
MNIST-5k), whose first active phase ran once before (its first-answer generation is on the
driver in every setting). What is timed is the task's next active phase: ``--generations``
generations of ``--children`` children, ``--cycles`` cycles each. The settings:

* ``local``: no Ray, the evolver's own 2 CPU devices (``--cpu-devices 2``), one child per
  device at a time;
* ``ray1`` / ``ray2``: a ``ray.cluster_utils.Cluster`` started by the process, a head node
  without CPUs and 1 or 2 nodes of 1 CPU each; the driver (the evolver) has 1 CPU device.

Reported per setting: children per minute of the timed phase, the published path's
validation accuracy (the same children train in every setting, so it is the same path),
and for Ray the bytes put into the object store (the phase's data once; the parameters and
momentum children start from, once per component and phase), the bytes of results read
back, and the mean seconds per child beyond its training (scheduling, transfer, worker
start; children that waited for a free node count that wait too, so it is measured with
no more children than nodes per generation where possible).

    python benchmarks/ray_children.py --out docs/ray_children.json                 # 24 cycles: the main job's children
    python benchmarks/ray_children.py --cycles 4 --out docs/ray_children_4cycles.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time


def worker(args: argparse.Namespace) -> None:
    from mu2net.server.compute import split_cpu_devices

    split_cpu_devices(2 if args.setting == "local" else 1)  # before anything creates the JAX backend
    from mu2net.evolver import Evolver, EvolverConfig, TrainBudget
    from mu2net.store import Store

    config = EvolverConfig(generations=args.generations, children=args.children,
                           budget=TrainBudget(args.cycles, 4096, 64), first_answer_epochs=0.0)
    pool, cluster = None, None
    if args.setting != "local":
        from ray.cluster_utils import Cluster

        from mu2net.evolver.ray_pool import RayChildren, wait_for_nodes

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        nodes = int(args.setting[-1])
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        pool = RayChildren(cluster.address)
        wait_for_nodes(nodes + 1)
    store = Store(args.store)
    evolver = Evolver(store, config, progress=False, ray=pool)
    t0 = time.perf_counter()
    evolver.active_phase(args.task)
    seconds = time.perf_counter() - t0
    path = store.best_path(args.task)
    out = {"setting": args.setting, "seconds": round(seconds, 2),
           "children": args.generations * args.children,
           "children_per_minute": round(60 * args.generations * args.children / seconds, 2),
           "validation_accuracy": path.metrics["validation_accuracy"] if path else None}
    if pool is not None:
        c = pool.counters
        out.update({"bytes_data_per_phase": int(c["data"]), "bytes_params_in": int(c["params"]),
                    "bytes_results_out": int(c["results"]),
                    "bytes_in_per_child": round(c["params"] / max(1, c["children"])),
                    "bytes_out_per_child": round(c["results"] / max(1, c["children"])),
                    "overhead_seconds_per_child": round(c["overhead_seconds"] / max(1, c["children"]), 3),
                    "nodes_used": len(set(pool.nodes))})
        import ray

        ray.shutdown()
        cluster.shutdown()
    store.close()
    print(json.dumps(out))


def prepare(args: argparse.Namespace, store_dir: str) -> None:
    """The store every setting starts from: root, task, and its first phase done."""
    code = f"""
import sys; sys.path.insert(0, {sys.path[0]!r})
from mu2net.evolver import Evolver, EvolverConfig, TrainBudget
from mu2net.ingest import add_task
from mu2net.root import init_root
from mu2net.store import Store
from quality import ROOT_HPARAMS, root_model
store = Store({store_dir!r})
init_root(store, *root_model(), ROOT_HPARAMS)
add_task(store, {args.task!r}, "builtin:{args.task}")
Evolver(store, EvolverConfig(generations=1, children={args.children}, budget=TrainBudget({args.cycles}, 4096, 64),
                             first_answer_epochs=0.0), progress=False).active_phase({args.task!r})
store.close()
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/ray_children.json")
    ap.add_argument("--task", default="mnist5k", help="built-in dataset of the active phase")
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--cycles", type=int, default=24, help="cycles per child (the main job's --cycles)")
    ap.add_argument("--settings", default="local,ray1,ray2")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="local", help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = f"{tmp}/base"
        prepare(args, base)
        for setting in args.settings.split(","):
            copy = f"{tmp}/{setting}"
            shutil.copytree(base, copy)
            cmd = [sys.executable, __file__, "--worker", "--setting", setting, "--store", copy, "--task", args.task,
                   "--generations", str(args.generations), "--children", str(args.children),
                   "--cycles", str(args.cycles)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(line))
            print(line, flush=True)
    local = next((r for r in results if r["setting"] == "local"), None)
    for r in results:
        if local is not None and r is not local:
            r["against_local"] = round(r["children_per_minute"] / local["children_per_minute"], 3)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "results": results}, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

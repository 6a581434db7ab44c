"""Children trained one after another on one CPU device against in parallel on one device per CPU.

Each measurement is a fresh process (the CPU platform's device count is fixed when JAX's
backend starts) running the real evolver: the quality benchmark's root (random init, no
transformer blocks, 28x28, patch 7, width 64) and one active phase on a built-in task
(default MNIST-5k) with 2 children per generation. The two settings alternate, ``--rounds`` times each;
the report gives the median phase time of each and their ratio, and checks that both
published the same path (same validation and test accuracy).

    python benchmarks/parallel_children.py --out docs/parallel_children.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time


def worker(args: argparse.Namespace) -> None:
    from mu2net.server.compute import split_cpu_devices

    split_cpu_devices(args.cpu_devices)  # before anything creates the JAX backend
    from mu2net.evolver import Evolver, EvolverConfig, TrainBudget
    from mu2net.root import init_root
    from mu2net.ingest import add_task
    from mu2net.store import Store
    from quality import ROOT_HPARAMS, root_model  # benchmarks/quality.py, beside this script

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        init_root(store, *root_model(), ROOT_HPARAMS)
        add_task(store, args.task, f"builtin:{args.task}")
        evolver = Evolver(store, EvolverConfig(generations=args.generations, children=2,
                                               budget=TrainBudget(args.cycles, 4096, 64)), progress=False)
        t0 = time.perf_counter()
        evolver.run(1)
        seconds = time.perf_counter() - t0
        path = store.best_path(args.task)
        assert path is not None
        print(json.dumps({"devices": len(evolver.devices), "seconds": seconds,
                          "validation_accuracy": path.metrics["validation_accuracy"],
                          "test_accuracy": path.metrics["test_accuracy"],
                          "images_per_second": statistics.median(evolver.stats["images_per_second"])}))
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/parallel_children.json")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--task", default="mnist5k", help="built-in dataset of the active phase")
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--cycles", type=int, default=8)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-devices", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(args.rounds):
        for devices in (1, 2):
            proc = subprocess.run([sys.executable, __file__, "--worker", "--cpu-devices", str(devices),
                                   "--task", args.task, "--generations", str(args.generations),
                                   "--cycles", str(args.cycles)],
                                  capture_output=True, text=True, check=True)
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[devices].append(run)
            print(f"round {r + 1}, {devices} CPU device(s): {run['seconds']:.1f} s, "
                  f"validation {run['validation_accuracy']:.4f}, test {run['test_accuracy']:.4f}")
    median = {d: statistics.median(x["seconds"] for x in v) for d, v in runs.items()}
    same = len({(x["validation_accuracy"], x["test_accuracy"]) for v in runs.values() for x in v}) == 1
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "cpu_devices")},
              "runs": {str(d): v for d, v in runs.items()},
              "median_seconds": {str(d): s for d, s in median.items()},
              "speedup_2_devices": median[1] / median[2], "same_published_path": same}
    print(f"one device: {median[1]:.1f} s; two devices: {median[2]:.1f} s; "
          f"speed-up {median[1] / median[2]:.2f}x; same published path: {same}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

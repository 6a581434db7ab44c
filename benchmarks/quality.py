"""The paper's preliminary experiment (Section 4) on real data, with independent baselines.

Random-init root with no transformer blocks; three real tasks (Fashion-MNIST, MNIST-5k,
digits), digits private; 2 task iterations each. Then, for every task, an independent
baseline: the same ViT architecture as the task's published path, randomly initialised,
every component trainable, trained on that task alone with the same number of training
samples that the published path's lineage spent on the task (its provenance), with the
root hyperparameters, keeping the best validation checkpoint.

    python benchmarks/quality.py --data-dir /tmp/mu2net-quality --out docs/quality.json

With ``--baseline-only`` it evolves nothing: it reads an existing store (e.g. the main job's,
``scripts/main.sh``, after its run) and trains the equal-sample baselines of the paths it
serves, beside each path's own accuracies:

    python benchmarks/quality.py --baseline-only --data-dir /work/mu2net-pat-seed2 --out docs/baseline_patience_seed2.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from mu2net import components as C
from mu2net import datasets as D
from mu2net import paths as P
from mu2net import root as R
from mu2net.cli import format_report, parse_root_hparam, report
from mu2net.evolver import Evolver, EvolverConfig, TrainBudget, train_child
from mu2net.ingest import add_task
from mu2net.root import init_root
from mu2net.evolver.scoring import accuracy_scorer
from mu2net.server.compute import split_cpu_devices
from mu2net.store import Store

#: (name, source, private), in the order the tasks are introduced.
TASKS = (("mnist5k", "builtin:mnist5k", False), ("fashion_mnist", "builtin:fashion_mnist", False),
         ("digits", "builtin:digits", True))
ROOT_HPARAMS = {"mu": 0.3, "learning_rate": 0.05, "flip": False, "crop_area_min": 0.5}


def root_model(patch_size: int = 7, width: int = 64) -> tuple:
    """The experiment's root: a random-init ViT without transformer blocks (28x28 input, MLP
    2 x width, 4 heads, seed 0), as ``(architecture, params)`` of :func:`mu2net.root.random_root`."""
    config = C.ViTConfig(image_size=28, patch_size=patch_size, width=width, mlp_dim=2 * width, num_heads=4)
    return R.random_root(config, num_blocks=0, seed=0)


def parse_order(text: str) -> list[str]:
    """``--order``: comma-separated names of :data:`TASKS`, each at most once; exits otherwise."""
    order = text.split(",")
    names = sorted(t[0] for t in TASKS)
    if len(set(order)) != len(order) or not set(order) <= set(names):
        raise SystemExit(f"--order {text!r} must list tasks of {names}, each at most once")
    return order


def task_splits(task) -> tuple:
    """A stored task's (train, validation, test) arrays, each ``(images, labels)``."""
    return tuple(D.read_split(task.dataset_dir, task.splits[s]) for s in ("train", "validation", "test"))


def init_params(arch, seed: int) -> list:
    """Random initialisation of every component of ``arch`` (numpy pytrees), one key per
    position drawn from ``numpy.random.default_rng(seed)``: the baselines' initialisation."""
    keys = np.random.default_rng(seed)
    return [jax.device_get(C.init_component(k, arch.config, jax.random.PRNGKey(int(keys.integers(2**31))),
                                            arch.num_classes)) for k in arch.kinds]


def baseline(name: str, splits: tuple, arch, samples: int, root_hparams: dict, args: argparse.Namespace,
             seed: int) -> dict:
    """Trains ``arch`` from random initialisation (seed ``seed``), every component trainable,
    on task ``name`` alone (``splits``: its train, validation and test arrays) for at least
    ``samples`` training examples (whole cycles of min(1 epoch, sample cap)), with the root
    hyperparameters; returns its best-validation checkpoint's accuracies."""
    train, val, test = splits
    params = init_params(arch, seed)
    per_cycle = min(len(train[0]), args.sample_cap)
    cycles = max(1, math.ceil(samples / per_cycle))
    tb = time.time()
    with tqdm(total=cycles, desc=f"baseline {name} seed {seed}", unit="cycle") as bar:
        def on_cycle(done: int, acc: float) -> None:
            bar.update()
            bar.set_postfix(val=f"{acc:.4f}")
        res = train_child(arch, params, [None] * len(params), (True,) * len(params),
                          R.root_hparams(root_hparams), train, val,
                          TrainBudget(cycles, args.sample_cap, args.batch_size), accuracy_scorer(), seed=seed,
                          on_cycle=on_cycle)
    acc = P.accuracy(arch, [res.params[i] for i in range(len(params))], *test)
    seconds = time.time() - tb
    tqdm.write(f"baseline {name} seed {seed}: test {acc:.4f} ({cycles * per_cycle} samples, {seconds:.0f}s)")
    return {"seed": seed, "train_samples": cycles * per_cycle, "mu2net_lineage_samples": samples,
            "validation_accuracy": res.validation_accuracy, "test_accuracy": acc, "seconds": seconds,
            "blocks": arch.num_blocks}


def baselines(store: Store, args: argparse.Namespace, root_hparams: dict, seeds: list[int]) -> dict:
    """The equal-sample baseline of every task the store serves, once per seed of ``seeds``:
    ``{"baselines": {task: first seed's run}, "baseline_seeds": {task: [runs]}}`` (runs as
    :func:`baseline` returns them). A path's lineage samples are its most-trained component's
    steps on the task times ``--batch-size`` (the provenance the store records)."""
    comps = {c.id: c for c in store.list_components()}
    out: dict = {"baselines": {}, "baseline_seeds": {}}
    for t in store.list_tasks():
        path = store.best_path(t.name)
        if path is None:
            continue
        steps = max(comps[c].steps.get(t.name, 0) for c in path.component_ids)
        recorded = path.metrics.get("lineage_samples")
        if recorded is not None and recorded != steps * args.batch_size:  # e.g. another --batch-size
            tqdm.write(f"note: task {t.name}: its path records {recorded} lineage samples, the baseline gets "
                       f"{steps} steps x --batch-size {args.batch_size} = {steps * args.batch_size}")
        splits = task_splits(t)
        runs = [baseline(t.name, splits, path.architecture, steps * args.batch_size, root_hparams, args, seed)
                for seed in seeds]
        out["baselines"][t.name] = runs[0]
        out["baseline_seeds"][t.name] = runs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="docs/quality.json")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--cycles", type=int, default=24)
    ap.add_argument("--sample-cap", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=7)
    ap.add_argument("--max-blocks", type=int, default=12,
                    help="most transformer blocks a path may grow to (layer insertion stops there)")
    ap.add_argument("--order", default=",".join(t[0] for t in TASKS),
                    help="comma-separated task introduction order (a subset runs only those tasks)")
    ap.add_argument("--root-hparam", action="append", type=parse_root_hparam, default=[], metavar="NAME=VALUE",
                    help=f"overrides a root hyperparameter of {ROOT_HPARAMS} (repeatable)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--baseline-only", action="store_true",
                    help="evolve nothing: train the equal-sample baselines of the paths an existing store "
                         "serves (the store is only read; its root hyperparameters must be --root-hparam's and "
                         "its batch size --batch-size; the evolution flags are ignored)")
    ap.add_argument("--seed", type=int, default=0,
                    help="evolver seed (parent sampling, mutations, initialisation, batch order, augmentation)")
    ap.add_argument("--baseline-seeds", default="1",
                    help="comma-separated seeds of the baselines; one baseline per task and seed (the first "
                         "is reported as the task's baseline, all of them under baseline_seeds)")
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="devices the CPU platform exposes, one child trained on each at once (default: one per CPU)")
    args = ap.parse_args()
    split_cpu_devices(args.cpu_devices)  # before anything creates the JAX backend
    root_hparams = {**ROOT_HPARAMS, **dict(args.root_hparam)}
    by_name = {t[0]: t for t in TASKS}
    order = parse_order(args.order)
    try:
        baseline_seeds = [int(s) for s in args.baseline_seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--baseline-seeds {args.baseline_seeds!r} must be comma-separated integers") from None

    if args.baseline_only:
        if args.skip_baseline:
            raise SystemExit("--baseline-only and --skip-baseline exclude each other")
        if not os.path.isfile(os.path.join(args.data_dir, "mu2net.sqlite")):  # (Store() would create one)
            raise SystemExit(f"--baseline-only: no store at --data-dir {args.data_dir!r} (no mu2net.sqlite)")
        store = Store(args.data_dir)
        if not any(store.best_path(t.name) for t in store.list_tasks()):
            raise SystemExit(f"--baseline-only: the store at {args.data_dir!r} serves no task")
        root = store.root_path()
        if root is not None and dict(root.hparams) != R.root_hparams(root_hparams):
            raise SystemExit(f"--baseline-only: the store's root hyperparameters {dict(root.hparams)} are not "
                             f"{R.root_hparams(root_hparams)} (give them with --root-hparam)")
        results = {"baseline_only": True, "config": vars(args), "root_hparams": root_hparams,
                   "report": report(store), "baselines": {}, "baseline_seeds": {}}
        results.update(baselines(store, args, root_hparams, baseline_seeds))
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        return

    store = Store(args.data_dir)
    arch, params = root_model(args.patch_size, args.width)
    init_root(store, arch, params, root_hparams)
    known = {t.name for t in store.list_tasks()}
    for name, source, private in (by_name[n] for n in order):
        if name not in known:
            add_task(store, name, source, private=private)
    ev_config = EvolverConfig(generations=args.generations, children=args.children,
                              budget=TrainBudget(args.cycles, args.sample_cap, args.batch_size),
                              max_blocks=args.max_blocks, seed=args.seed)
    t0 = time.time()
    evolver = Evolver(store, ev_config)
    phases = evolver.run(args.iterations)
    evolve_seconds = time.time() - t0
    rep = report(store)
    print(format_report(rep))

    # phases_run 0: the store had finished already (e.g. a re-run for more baseline seeds)
    results = {"evolve_seconds": evolve_seconds, "phases_run": phases, "config": vars(args),
               "root_hparams": root_hparams, "report": rep, "baselines": {}, "baseline_seeds": {},
               "devices": [str(d) for d in evolver.devices]}
    if not args.skip_baseline:
        results.update(baselines(store, args, root_hparams, baseline_seeds))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

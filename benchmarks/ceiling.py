"""What the quality experiment's ViT family reaches when trained plainly with (most of) the budget.

A reference point for the absolute targets of ``benchmarks/quality.py`` (MNIST-5k >= 0.97,
Fashion-MNIST >= 0.89, digits >= 0.98, all three tasks within 60 minutes on this CPU): for
each task, one ViT of the experiment's family (28x28 input, patch 7, width 64, MLP 128,
4 heads; ``--blocks`` transformer blocks) is randomly initialised and trained on that task
alone, every component trainable, with the experiment's root hyperparameters, budget
cycles (min(1 epoch, sample cap) samples, validation after each) and train step, keeping
the best validation checkpoint: the same procedure as the experiment's baselines, with a
sample count chosen here (``--samples``) instead of the count an evolved lineage spent.
The summed ``seconds`` say whether such a plain run fits the experiment's 60 minutes.

``--minutes M`` instead gives each task M minutes of wall clock (compute-matched plain
training for issue 16's anytime curves: the evolver's first T minutes against plain training
of each task for T/3 minutes, the share of the machine a task gets when the evolver serves
three): a one-cycle run compiles the steps, a 4-cycle calibration run then measures the
task's seconds per cycle (validation included; its set-up and final test evaluation too, so
the count errs slightly low), and the sample count is the whole cycles that fit in M
minutes (the calibration runs themselves are not counted).

    python benchmarks/ceiling.py --data-dir /tmp/mu2net-ceiling --out docs/quality_ceiling.json
    python benchmarks/ceiling.py --data-dir /tmp/mu2net-ceiling --minutes 5 --out docs/plain_5min.json
"""

from __future__ import annotations

import argparse
import json
import time

from quality import ROOT_HPARAMS, TASKS, baseline, parse_order, root_model, task_splits

from mu2net import components as C
from mu2net.ingest import add_task
from mu2net.paths import Architecture
from mu2net.store import Store

#: Default training samples per task: about 42 epochs of Fashion-MNIST's 57,000 training
#: images, 375 of MNIST-5k's 3,200 and 350 of digits' 1,150 (their budget cycles are whole
#: epochs, so the counts are rounded up to whole cycles).
DEFAULT_SAMPLES = {"mnist5k": 1_200_000, "fashion_mnist": 2_400_000, "digits": 400_000}


#: Train cycles of the compiled calibration run of ``--minutes`` (after a one-cycle warm-up run
#: that compiles the steps, so compilation does not count as training time).
CALIBRATION_CYCLES = 4


def parse_samples(text: str) -> tuple[str, int]:
    """``TASK=N`` -> (task, N); N a positive integer."""
    name, sep, value = text.partition("=")
    names = [t[0] for t in TASKS]
    if not sep or name not in names:
        raise argparse.ArgumentTypeError(f"{text!r} must be TASK=N with TASK one of {names}")
    if not value.isdigit() or int(value) == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: N must be a positive integer, got {value!r}")
    return name, int(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="store that holds the task datasets (created if missing)")
    ap.add_argument("--out", default="docs/quality_ceiling.json")
    ap.add_argument("--blocks", type=int, default=4, help="transformer blocks of the trained ViT")
    ap.add_argument("--samples", action="append", type=parse_samples, default=[], metavar="TASK=N",
                    help=f"training samples of a task (repeatable; defaults {DEFAULT_SAMPLES})")
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock minutes of plain training per task (overrides --samples)")
    ap.add_argument("--order", default=",".join(t[0] for t in TASKS),
                    help="comma-separated tasks to train, in this order")
    ap.add_argument("--sample-cap", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.blocks < 0:
        raise SystemExit(f"--blocks must be >= 0, got {args.blocks}")
    by_name = {t[0]: t for t in TASKS}
    order = parse_order(args.order)
    samples = {**DEFAULT_SAMPLES, **dict(args.samples)}

    store = Store(args.data_dir)
    root_arch, _ = root_model()
    kinds = root_arch.kinds[:3] + (C.TRANSFORMER_BLOCK,) * args.blocks + (C.HEAD,)
    known = {t.name for t in store.list_tasks()}
    results: dict = {"config": vars(args), "root_hparams": ROOT_HPARAMS, "runs": {}}
    t0 = time.time()
    for name in order:
        _, source, private = by_name[name]
        if name not in known:
            add_task(store, name, source, private=private)
        task = store.get_task(name)
        arch = Architecture(root_arch.config, kinds, task.num_classes)
        splits = task_splits(task)
        n = samples[name]
        calibration = None
        if args.minutes is not None:
            if args.minutes <= 0:
                raise SystemExit(f"--minutes must be > 0, got {args.minutes}")
            per_cycle = min(len(splits[0][0]), args.sample_cap)
            # the first run compiles the train and evaluation steps (cached for the process); the
            # second, of CALIBRATION_CYCLES cycles, measures a compiled cycle with its validation
            baseline(name, splits, arch, per_cycle, ROOT_HPARAMS, args, args.seed)
            calibration = baseline(name, splits, arch, CALIBRATION_CYCLES * per_cycle, ROOT_HPARAMS, args,
                                   args.seed)["seconds"] / CALIBRATION_CYCLES
            n = max(1, int(args.minutes * 60 / calibration)) * per_cycle
        results["runs"][name] = baseline(name, splits, arch, n, ROOT_HPARAMS, args, args.seed)
        results["runs"][name]["calibration_seconds_per_cycle"] = calibration
    results["seconds"] = time.time() - t0
    print(json.dumps({k: {m: v[m] for m in ("train_samples", "validation_accuracy", "test_accuracy", "seconds")}
                      for k, v in results["runs"].items()}, indent=1))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

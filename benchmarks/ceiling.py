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

``--marks 5,10,20`` is anytime plain training, compute-matched at several points in one run
per task: the schedule is sized (by the same calibration) for the last mark's minutes, and
at each mark the best validation checkpoint so far is evaluated on the test split (that
evaluation is not counted as training time). The marks 5, 10 and 20 match the evolver's 15,
30 and 60 minutes over three tasks. An earlier mark's checkpoint is one of a schedule sized
for the last mark (its learning rate has not decayed yet), as the served checkpoints of the
evolver's long first children are; a run sized for that mark alone could be better.
``--validation-ratio R`` validates as the evolver's ``--long-validation-ratio R`` does: the
schedule split evenly into cycles of about R x the validation split's examples (where
that is more than the budget's cycle), so validation costs about the same share of time.

    python benchmarks/ceiling.py --data-dir /tmp/mu2net-ceiling --marks 5,10,20 --validation-ratio 10 \
        --out docs/plain_anytime_seed1.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

from quality import ROOT_HPARAMS, TASKS, baseline, init_params, parse_order, root_model, task_splits
from tqdm.auto import tqdm

from mu2net import components as C
from mu2net import paths as P
from mu2net import root as R
from mu2net.evolver import TrainBudget
from mu2net.evolver.scoring import accuracy_scorer
from mu2net.evolver.training import ChildTraining
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


def parse_marks(text: str) -> list[float]:
    """``--marks``: comma-separated positive minutes, increasing -> list of floats."""
    try:
        marks = [float(m) for m in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--marks {text!r} must be comma-separated minutes, e.g. 5,10,20")
    if not marks or any(not (m > 0 and math.isfinite(m)) for m in marks) or marks != sorted(set(marks)):
        raise argparse.ArgumentTypeError(f"--marks {text!r} must be increasing positive minutes, e.g. 5,10,20")
    return marks


def anytime_plain(name: str, splits: tuple, arch: P.Architecture, marks: list[float],
                  args: argparse.Namespace) -> dict:
    """Plain training of ``arch`` on one task for ``marks[-1]`` minutes of training time,
    with the best validation checkpoint's test accuracy at each mark (``--marks``).

    The schedule (its learning-rate decay spans all of it) is sized from a calibration: a
    one-cycle run compiles the steps, a ``CALIBRATION_CYCLES``-cycle run measures a cycle's
    seconds with its validation. Returns the marks (minutes, training examples so far,
    validation and test accuracy of the best checkpoint so far) and the schedule."""
    train, val, test = splits
    hparams = R.root_hparams(ROOT_HPARAMS)

    def child(cycles: int, per_cycle: int) -> ChildTraining:
        return ChildTraining(arch, init_params(arch, args.seed), [None] * len(arch.kinds),
                             (True,) * len(arch.kinds), hparams, train, val,
                             TrainBudget(cycles, per_cycle, args.batch_size, min_samples=per_cycle),
                             accuracy_scorer(), seed=args.seed)

    # cycles of min(1 epoch, sample cap) as the baselines', or of about R x the validation
    # split where that is more (the evolver's long first child under --long-validation-ratio R)
    per_cycle = max(min(len(train[0]), args.sample_cap), math.ceil(args.validation_ratio * len(val[0])))
    child(1, per_cycle).run(1)  # compiles the train and validation steps
    t0 = time.perf_counter()
    child(CALIBRATION_CYCLES, per_cycle).run(CALIBRATION_CYCLES)
    seconds_per_cycle = (time.perf_counter() - t0) / CALIBRATION_CYCLES
    budget_cycles = max(1, int(marks[-1] * 60 / seconds_per_cycle))
    run = child(budget_cycles, per_cycle)
    points: list[dict] = []
    clock = 0.0
    with tqdm(total=budget_cycles, desc=f"plain {name} ({marks[-1]:g} min)", unit="cycle") as bar:
        while len(points) < len(marks):
            if run.cycles_done < budget_cycles:
                t = time.perf_counter()
                run.run(1)
                clock += time.perf_counter() - t
                bar.update()
                bar.set_postfix(val=f"{run.best.validation_accuracy:.4f}")
            # every mark passed by now (all remaining ones once the schedule is done) gets the
            # best checkpoint so far
            while len(points) < len(marks) and (clock >= marks[len(points)] * 60
                                                or run.cycles_done >= budget_cycles):
                best = run.best
                test_acc = P.accuracy(arch, [best.params[i] for i in range(len(arch.kinds))], *test)
                points.append({"minutes": marks[len(points)], "training_minutes": round(clock / 60, 2),
                               "train_samples": run.images, "best_checkpoint_samples": best.steps * args.batch_size,
                               "validation_accuracy": best.validation_accuracy, "test_accuracy": test_acc})
                tqdm.write(f"plain {name} at {points[-1]['minutes']:g} min: test {test_acc:.4f} "
                           f"(validation {best.validation_accuracy:.4f}, {run.images} examples)")
    return {"marks": points, "cycles": budget_cycles, "cycle_samples": per_cycle,
            "calibration_seconds_per_cycle": seconds_per_cycle, "blocks": arch.num_blocks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="store that holds the task datasets (created if missing)")
    ap.add_argument("--out", default="docs/quality_ceiling.json")
    ap.add_argument("--blocks", type=int, default=4, help="transformer blocks of the trained ViT")
    ap.add_argument("--samples", action="append", type=parse_samples, default=[], metavar="TASK=N",
                    help=f"training samples of a task (repeatable; defaults {DEFAULT_SAMPLES})")
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock minutes of plain training per task (overrides --samples)")
    ap.add_argument("--marks", type=parse_marks, default=None, metavar="M1,M2,...",
                    help="anytime plain training: one run per task of the last mark's minutes, the best "
                         "checkpoint's test accuracy at each mark (overrides --minutes and --samples)")
    ap.add_argument("--validation-ratio", type=float, default=0.0, metavar="R",
                    help="with --marks: cycles of about R x the validation split (the evolver's "
                         "--long-validation-ratio); 0 = min(1 epoch, sample cap)")
    ap.add_argument("--order", default=",".join(t[0] for t in TASKS),
                    help="comma-separated tasks to train, in this order")
    ap.add_argument("--sample-cap", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not (args.validation_ratio >= 0 and math.isfinite(args.validation_ratio)):
        raise SystemExit(f"--validation-ratio must be a finite number >= 0, got {args.validation_ratio}")
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
        if args.marks is not None:
            results["runs"][name] = anytime_plain(name, splits, arch, args.marks, args)
            continue
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
    if args.marks is None:
        print(json.dumps({k: {m: v[m] for m in ("train_samples", "validation_accuracy", "test_accuracy", "seconds")}
                          for k, v in results["runs"].items()}, indent=1))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

"""The ``mu2net`` command line: ``evolve`` and ``report``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from mu2net import hparams as H


def _root_hparam(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--root-hparam {text!r} must be NAME=VALUE")
    name, raw = text.split("=", 1)
    if name not in H.SEARCH_SPACE:
        raise argparse.ArgumentTypeError(f"unknown hyperparameter {name!r}; allowed: {sorted(H.SEARCH_SPACE)}")
    value = {"true": True, "false": False}.get(raw.lower()) if isinstance(H.SEARCH_SPACE[name][0], bool) \
        else float(raw)
    if value not in H.SEARCH_SPACE[name]:
        raise argparse.ArgumentTypeError(f"{name}={raw} is not a Table 1 value; allowed: {list(H.SEARCH_SPACE[name])}")
    return name, value


def _task_arg(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--task {text!r} must be NAME=SOURCE")
    name, source = text.split("=", 1)
    return name, source


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mu2net", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evolve", help="add tasks and run task iterations of the mu2Net evolver")
    ev.add_argument("--data-dir", required=True, help="store directory (created if missing)")
    ev.add_argument("--task", action="append", type=_task_arg, default=[], metavar="NAME=SOURCE",
                    help="add a task (SOURCE: .npz, ImageFolder dir/archive, builtin:NAME); repeatable")
    ev.add_argument("--private", action="append", default=[], metavar="NAME", help="make task NAME private")
    ev.add_argument("--acl-group", action="append", default=[], metavar="NAME=GROUP",
                    help="ACL group of a private task (default: its own name)")
    ev.add_argument("--iterations", type=int, default=2, help="task iterations per task (paper Section 4: 2)")
    ev.add_argument("--generations", type=int, default=4)
    ev.add_argument("--children", type=int, default=4, help="children per generation")
    ev.add_argument("--cycles", type=int, default=4, help="train/validation cycles per child")
    ev.add_argument("--sample-cap", type=int, default=4096, help="most training examples per cycle")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--paper-preset", action="store_true", help="use the paper's budget (slow on a CPU)")
    ev.add_argument("--scorer", choices=("accuracy", "size_penalty"), default="accuracy")
    ev.add_argument("--max-blocks", type=int, default=12)
    ev.add_argument("--seed", type=int, default=0)
    root = ev.add_argument_group("root model (used only when the store is new)")
    root.add_argument("--root-checkpoint", help="vision_transformer .npz checkpoint to start from")
    root.add_argument("--image-size", type=int, default=28)
    root.add_argument("--patch-size", type=int, default=4)
    root.add_argument("--width", type=int, default=96)
    root.add_argument("--mlp-dim", type=int, default=192)
    root.add_argument("--num-heads", type=int, default=4)
    root.add_argument("--root-blocks", type=int, default=0, help="transformer blocks of a random root")
    root.add_argument("--root-hparam", action="append", type=_root_hparam, default=[], metavar="NAME=VALUE",
                      help="override a Table 1 default for the root path, e.g. flip=false")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    rp = sub.add_parser("report", help="print tasks, accuracies, parameters and the layer pool")
    rp.add_argument("--data-dir", required=True)
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def cmd_evolve(args: argparse.Namespace) -> int:
    from mu2net import components as C
    from mu2net import root as R
    from mu2net.evolver import PAPER_PRESET, Evolver, EvolverConfig, TrainBudget, add_task, init_root
    from mu2net.store import Store, TaskExists

    store = Store(args.data_dir)
    if store.root_path() is None:
        if args.root_checkpoint:
            arch, params = R.load_vit_checkpoint(args.root_checkpoint)
        else:
            config = C.ViTConfig(args.image_size, args.patch_size, args.width, args.mlp_dim, args.num_heads)
            arch, params = R.random_root(config, args.root_blocks, args.seed)
        init_root(store, arch, params, dict(args.root_hparam))
    groups = dict(g.split("=", 1) for g in args.acl_group)
    known = {t.name for t in store.list_tasks()}
    for name, source in args.task:
        if name in known:
            print(f"task {name!r} already in the store; continuing it", file=sys.stderr)
            continue
        try:
            add_task(store, name, source, private=name in args.private, acl_group=groups.get(name))
        except TaskExists:
            continue
        print(f"added task {name!r} from {source}", file=sys.stderr)
    if args.paper_preset:
        config = PAPER_PRESET
    else:
        config = EvolverConfig(generations=args.generations, children=args.children,
                               budget=TrainBudget(args.cycles, args.sample_cap, args.batch_size),
                               scorer=args.scorer, max_blocks=args.max_blocks, seed=args.seed)
    Evolver(store, config, progress=not args.quiet).run(args.iterations)
    print(format_report(report(store)))
    return 0


def report(store: Any) -> dict[str, Any]:
    """Per task: accuracies, path length, parameters, parent tasks, knowledge transfer;
    and the pool totals (the paper's Table 7 / Figure 2 columns)."""
    comps = {c.id: c for c in store.list_components()}
    tasks = []
    for t in store.list_tasks():
        path = store.best_path(t.name)
        row: dict[str, Any] = {"task": t.name, "state": t.state, "private": t.private,
                               "iterations_done": t.iterations_done, "num_classes": t.num_classes}
        if path is not None:
            steps: dict[str, int] = {}
            for cid in path.component_ids:
                for k, v in comps[cid].steps.items():
                    steps[k] = steps.get(k, 0) + v
            total_steps = sum(steps.values()) or 1
            parent_tasks = sorted({comps[c].task for c in path.component_ids
                                   if comps[c].task not in (None, t.name)})
            row.update({
                "path_id": path.id, "score": path.score,
                "validation_accuracy": path.metrics.get("validation_accuracy"),
                "test_accuracy": path.metrics.get("test_accuracy"),
                "path_length": len(path.component_ids),
                "transformer_blocks": path.architecture.num_blocks,
                "activated_params": sum(comps[c].num_params for c in path.component_ids),
                "trainable_params": sum(comps[c].num_params for c in path.component_ids if comps[c].task == t.name),
                "parent_tasks": parent_tasks,
                "knowledge_transfer": {k: round(100.0 * v / total_steps, 1) for k, v in sorted(steps.items())},
                "hparams": dict(path.hparams),
            })
        tasks.append(row)
    return {"system_version": store.system_version(), "tasks": tasks,
            "pool": {"components": len(comps), "total_params": sum(c.num_params for c in comps.values())}}


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"system version {rep['system_version']}; layer pool: {rep['pool']['components']} components, "
             f"{rep['pool']['total_params']:,} parameters"]
    header = f"{'task':<16}{'state':<9}{'it':>3}{'val acc':>9}{'test acc':>9}{'len':>5}{'blocks':>7}" \
             f"{'activated':>11}{'trainable':>11}  parents / knowledge transfer (% of steps)"
    lines.append(header)
    for r in rep["tasks"]:
        if "path_id" not in r:
            lines.append(f"{r['task']:<16}{r['state']:<9}{r['iterations_done']:>3}  (no path yet)")
            continue
        kt = ", ".join(f"{k} {v}%" for k, v in r["knowledge_transfer"].items())
        name = r["task"] + (" (p)" if r["private"] else "")
        lines.append(f"{name:<16}{r['state']:<9}{r['iterations_done']:>3}{r['validation_accuracy']:>9.4f}"
                     f"{r['test_accuracy']:>9.4f}{r['path_length']:>5}{r['transformer_blocks']:>7}"
                     f"{r['activated_params']:>11,}{r['trainable_params']:>11,}  "
                     f"{','.join(r['parent_tasks']) or '-'} / {kt}")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mu2net.store import Store

    if not (Path(args.data_dir) / "mu2net.sqlite").exists():
        print(f"error: {args.data_dir!r} is not a mu2net store (no mu2net.sqlite)", file=sys.stderr)
        return 2
    rep = report(Store(args.data_dir))
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    from mu2net.datasets import DatasetError

    try:
        return {"evolve": cmd_evolve, "report": cmd_report}[args.command](args)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

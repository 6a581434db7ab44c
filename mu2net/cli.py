"""The ``mu2net`` command line: serve, evolve, upload, classify, tasks, status, wake and report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from typing import Any, Sequence

from mu2net import hparams as H


def parse_root_hparam(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` -> (name, Table 1 value); argparse type of ``--root-hparam``.

    Raises:
      argparse.ArgumentTypeError: naming the bad name or value and the allowed ones.
    """
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


def _positive_float_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: a number > 0") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{value}; allowed: a finite number > 0")
    return value


def ray_children(args: argparse.Namespace) -> Any:
    """The :class:`mu2net.evolver.ray_pool.RayChildren` of ``--ray-address``, or None."""
    if args.ray_address is None:
        return None
    from mu2net.evolver.ray_pool import RayChildren

    return RayChildren(args.ray_address, cpus_per_child=args.ray_cpus_per_child)


def _nonnegative_int_arg(text: str) -> int:
    return _count_arg(text, 0, "an integer >= 0")


def _count_arg(text: str, minimum: int, allowed: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; {allowed}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value}; {allowed}")
    return value


def _compute_threads_arg(text: str) -> int:
    """argparse type of ``serve --compute-threads``: an int >= 0."""
    return _count_arg(text, 0, "allowed: 0 (one per CPU) or a positive count")


def _cpu_devices_arg(text: str) -> int:
    """argparse type of ``--cpu-devices``: an int >= 1."""
    return _count_arg(text, 1, "allowed: a positive count")


def _read_token_arg(text: str) -> tuple[str, str]:
    """argparse type of ``serve --read-token GROUP=TOKEN``."""
    group, sep, token = text.partition("=")
    if not sep or not group or not token:
        raise argparse.ArgumentTypeError(f"--read-token {text!r} must be GROUP=TOKEN with both non-empty")
    return group, token


def _task_arg(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--task {text!r} must be NAME=SOURCE")
    name, source = text.split("=", 1)
    return name, source


#: ``mu2net serve``'s default ``--first-answer-epochs`` (issue 16's fresh-server probes,
#: docs/results.md "A long first child"); ``mu2net evolve`` keeps Algorithm 1's short
#: first children (0).
SERVE_FIRST_ANSWER_EPOCHS = 150.0
#: ``mu2net serve``'s random root for a new store: a few blocks, trained whole by a new
#: task's long first child, so a fresh server starts like plain training of a 4-block ViT
#: (issue 16); ``mu2net evolve`` (the preliminary experiment) keeps 0 blocks.
SERVE_ROOT_BLOCKS = 4
#: ``mu2net serve``'s random root's hyperparameters over Table 1's defaults: the values of the
#: plain-training reference (benchmarks/quality.py ROOT_HPARAMS: learning rate 0.05, crops
#: keeping at least half the image, no flips; mu 0.3), which reach 0.957 on MNIST-5k in 4.5
#: minutes here where Table 1's defaults (tuned for ImageNet fine-tuning) train a random
#: ViT slowly. ``--root-hparam`` overrides each; evolution mutates them from there.
SERVE_ROOT_HPARAMS: dict[str, Any] = {"learning_rate": 0.05, "crop_area_min": 0.5, "flip": False, "mu": 0.3}


def _nonnegative_float_arg(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: a finite number >= 0")
    return value


def add_evolver_args(p: argparse.ArgumentParser) -> None:
    """Budget, scorer and root-model flags shared by ``evolve``, ``serve`` and the evolver process."""
    p.add_argument("--iterations", type=int, default=2, help="task iterations per task (paper Section 4: 2)")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--children", type=int, default=4, help="children per generation")
    p.add_argument("--cycles", type=int, default=4, help="train/validation cycles per child")
    p.add_argument("--sample-cap", type=int, default=4096, help="most training examples per cycle")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--min-cycle-samples", type=lambda t: _count_arg(t, 0, "an integer >= 0"), default=0, metavar="N",
                   help="fewest training examples per cycle: a small training split is repeated for several "
                        "epochs per cycle (a cycle is min(--sample-cap, max(1 epoch, N)); 0: one epoch at most)")
    p.add_argument("--paper-preset", action="store_true", help="use the paper's budget (slow on a CPU)")
    p.add_argument("--scorer", choices=("accuracy", "size_penalty"), default="accuracy")
    p.add_argument("--max-blocks", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-devices", type=_cpu_devices_arg, default=None, metavar="N",
                   help="devices the CPU platform exposes; the evolver trains one child per device at "
                        "once (default: one per CPU; unused on a GPU/TPU host)")
    p.add_argument("--patience", type=int, default=5,
                   help="continual evolution pauses a task after this many task iterations in a row "
                        "without improvement (it wakes when a related task publishes, or on "
                        "POST /v1/tasks/NAME/evolve)")
    p.add_argument("--halving", type=lambda t: _count_arg(t, 1, "an integer >= 1 (1: off)"), default=1, metavar="ETA",
                   help="successive halving inside each generation: start children*ETA children, keep the best "
                        "1/ETA after each rung of train cycles (Hyperband; 1 turns it off)")
    p.add_argument("--lineage-children", type=_nonnegative_int_arg, default=0, metavar="K",
                   help="in a phase of a task already served, K of the children of each later generation "
                        "(--later-children or --children, times ETA) continue its best path (the served lineage) "
                        "instead of the paper's parent sampling (0: off)")
    p.add_argument("--later-children", type=_nonnegative_int_arg, default=0, metavar="N",
                   help="children per later generation in a phase of a task already served (0: --children); "
                        "with 1 and --long-data-parallel that one child trains over every device")
    p.add_argument("--lineage-lr-steps", type=_nonnegative_int_arg, default=0, metavar="S",
                   help="a lineage child's learning rate moves S values down Table 1's list (its parent's schedule "
                        "has annealed; 0: unchanged)")
    p.add_argument("--long-patience", type=_nonnegative_int_arg, default=0, metavar="N",
                   help="a long first child stops after N validations in a row without a better score, keeping "
                        "its best checkpoint (early stopping; 0: its whole schedule)")
    p.add_argument("--generation-patience", type=_nonnegative_int_arg, default=0, metavar="G",
                   help="an active phase ends after G later generations in a row that did not beat the task's "
                        "best score (0: every phase runs --generations)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="train the children of later generations and short first-answer children as Ray tasks on "
                        "the cluster at ADDR "
                        "(host:port, or auto for the cluster this host belongs to); this process stays the "
                        "only writer of the store (default: on this host's devices)")
    p.add_argument("--ray-cpus-per-child", type=_positive_float_arg, default=1.0, metavar="N",
                   help="CPUs a child reserves on a Ray cluster without GPUs or TPUs (else one accelerator each)")
    p.add_argument("--identity-insertion", action="store_true",
                   help="a block inserted by the layer-count mutation starts as the identity (zero-initialised "
                        "residual outputs), so the child starts from its parent's function")
    p.add_argument("--per-mutation-mu", action="store_true",
                   help="each mutation has its own mutation probability, inherited and itself mutated "
                        "(mu3Net); default: every mutation uses the path's mu (paper Section 3.2)")
    p.add_argument("--clone-random-root", action="store_true",
                   help="children always clone (train) the components of a randomly initialised root "
                        "instead of sharing them frozen unless the layer-cloning mutation picks them")
    p.add_argument("--first-answer-epochs", type=_nonnegative_float_arg, default=None, metavar="E",
                   help="a new task's first child on a randomly initialised root trains on one long schedule "
                        "of E epochs of its training split (at most --first-answer-max-samples examples), "
                        "publishing its improving checkpoints as it trains; 0: a short child "
                        f"(default: {SERVE_FIRST_ANSWER_EPOCHS:g} for serve, 0 for evolve)")
    p.add_argument("--first-answer-max-samples", type=lambda t: _count_arg(t, 1, "an integer >= 1"),
                   default=None, metavar="N", help="cap on the long first child's training examples "
                                                   "(default: 400000)")
    p.add_argument("--first-answer-blocks", type=lambda t: _count_arg(t, 1, "an integer >= 1"), default=None,
                   metavar="N", help="transformer blocks a new task's first child inserts into a random root "
                                     "without blocks (default: 1, the preliminary experiment's insertion)")
    p.add_argument("--long-validation-ratio", type=_nonnegative_float_arg, default=None, metavar="R",
                   help="a long first child's schedule is split evenly into cycles of about R x its validation "
                        "split's examples, so it validates less often (its validations then cost about 1/(3R) of "
                        "its compute); 0: the budget's cycles (default: 0)")
    p.add_argument("--long-data-parallel", action="store_true",
                   help="a long first child trains data-parallel over every local device (--cpu-devices) "
                        "instead of on one")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    root = p.add_argument_group("root model (used only when the store is new)")
    root.add_argument("--root-checkpoint", help="vision_transformer .npz checkpoint to start from")
    root.add_argument("--image-size", type=int, default=28)
    root.add_argument("--patch-size", type=int, default=7)
    root.add_argument("--width", type=int, default=64)
    root.add_argument("--mlp-dim", type=int, default=128)
    root.add_argument("--num-heads", type=int, default=4)
    root.add_argument("--root-blocks", type=lambda t: _count_arg(t, 0, "an integer >= 0"), default=None,
                      metavar="N", help=f"transformer blocks of a random root (default: {SERVE_ROOT_BLOCKS} for "
                                        "serve, 0 for evolve)")
    root.add_argument("--stem", choices=("patch", "conv"), default="patch",
                      help="first layer of a random root: a ViT patch embedding, or a convolutional stem "
                           "(stride-2 3x3 convolutions, Xiao et al. 2021; --patch-size must be a power of two)")
    root.add_argument("--root-hparam", action="append", type=parse_root_hparam, default=[], metavar="NAME=VALUE",
                      help="override a Table 1 default for the root path, e.g. flip=false (serve's random "
                           "root starts from " + ", ".join(f"{k}={v}" for k, v in SERVE_ROOT_HPARAMS.items()) + ")")


EVOLVER_FLAGS = ("iterations", "generations", "children", "cycles", "sample_cap", "batch_size", "min_cycle_samples",
                 "scorer",
                 "max_blocks", "seed", "cpu_devices", "patience", "halving", "first_answer_epochs",
                 "first_answer_max_samples", "first_answer_blocks", "long_validation_ratio", "lineage_children",
                 "lineage_lr_steps", "later_children", "long_patience", "generation_patience", "ray_address",
                 "ray_cpus_per_child")


def evolver_argv(args: argparse.Namespace) -> list[str]:
    """The evolver flags of ``args`` as a command line (for the evolver process)."""
    argv = []
    for name in EVOLVER_FLAGS:
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.paper_preset:
        argv.append("--paper-preset")
    if args.quiet:
        argv.append("--quiet")
    if args.clone_random_root:
        argv.append("--clone-random-root")
    if args.identity_insertion:
        argv.append("--identity-insertion")
    if args.per_mutation_mu:
        argv.append("--per-mutation-mu")
    if args.long_data_parallel:
        argv.append("--long-data-parallel")
    if not getattr(args, "no_continual", True):
        argv.append("--continual")
    return argv


def evolver_config(args: argparse.Namespace) -> Any:
    from mu2net.evolver import PAPER_PRESET, EvolverConfig, TrainBudget

    # the serving evolver (mu2net serve): a new upload comes first, and a task that stopped
    # improving gets longer children before it pauses
    serving = bool(getattr(args, "preempt", False))
    first_answer = {"first_answer_epochs": args.first_answer_epochs if args.first_answer_epochs is not None
                    else (SERVE_FIRST_ANSWER_EPOCHS if serving else 0.0)}
    if args.first_answer_max_samples is not None:
        first_answer["first_answer_max_samples"] = args.first_answer_max_samples
    if args.first_answer_blocks is not None:
        first_answer["first_answer_blocks"] = args.first_answer_blocks
    if args.long_validation_ratio is not None:
        first_answer["long_validation_ratio"] = args.long_validation_ratio
    # the options every configuration takes from the flags, the paper's preset too
    options: dict[str, Any] = dict(
        preempt=serving, grow_when_stale=serving, patience=args.patience, clone_random_root=args.clone_random_root,
        halving=args.halving, identity_insertion=args.identity_insertion,
        per_mutation_probabilities=args.per_mutation_mu, lineage_children=args.lineage_children,
        lineage_lr_steps=args.lineage_lr_steps, later_children=args.later_children,
        long_data_parallel=args.long_data_parallel, long_patience=args.long_patience,
        generation_patience=args.generation_patience, **first_answer)
    if args.paper_preset:
        return dataclasses.replace(PAPER_PRESET, budget=dataclasses.replace(PAPER_PRESET.budget,
                                                                            min_samples=args.min_cycle_samples),
                                   first_answer=serving or PAPER_PRESET.first_answer, **options)
    return EvolverConfig(generations=args.generations, children=args.children,
                         budget=TrainBudget(args.cycles, args.sample_cap, args.batch_size, args.min_cycle_samples),
                         scorer=args.scorer, max_blocks=args.max_blocks, seed=args.seed, **options)


def ensure_root(store: Any, args: argparse.Namespace, serving: bool = False) -> None:
    """Initialises the store's root model from the flags if the store is new; ``serving``
    (``mu2net serve``) defaults a random root to :data:`SERVE_ROOT_BLOCKS` blocks and
    :data:`SERVE_ROOT_HPARAMS`."""
    from mu2net import components as C
    from mu2net import root as R
    from mu2net.root import init_root

    if store.root_path() is not None:
        return
    if args.root_checkpoint:
        if args.stem != "patch" or args.root_blocks:
            raise SystemExit("mu2net: error: --stem and --root-blocks describe a random root; a --root-checkpoint "
                             "brings its own architecture")
        arch, params = R.load_vit_checkpoint(args.root_checkpoint)
    else:
        stem = C.CONV_STEM if args.stem == "conv" else C.PATCH_EMBEDDING
        try:
            config = C.ViTConfig(args.image_size, args.patch_size, args.width, args.mlp_dim, args.num_heads)
            blocks = args.root_blocks if args.root_blocks is not None else (SERVE_ROOT_BLOCKS if serving else 0)
            arch, params = R.random_root(config, blocks, args.seed, stem=stem)
        except ValueError as e:
            raise SystemExit(f"mu2net: error: root model: {e}") from None
    hparams = {**(SERVE_ROOT_HPARAMS if serving and not args.root_checkpoint else {}), **dict(args.root_hparam)}
    init_root(store, arch, params, hparams, pretrained=bool(args.root_checkpoint))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mu2net", description="mu2net: a multitask image classifier that keeps learning")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evolve", help="add tasks and run task iterations of the mu2Net evolver")
    ev.add_argument("--data-dir", required=True, help="store directory (created if missing)")
    ev.add_argument("--task", action="append", type=_task_arg, default=[], metavar="NAME=SOURCE",
                    help="add a task (SOURCE: .npz, ImageFolder dir/archive, builtin:NAME); repeatable")
    ev.add_argument("--private", action="append", default=[], metavar="NAME", help="make task NAME private")
    ev.add_argument("--acl-group", action="append", default=[], metavar="NAME=GROUP",
                    help="ACL group of a private task (default: its own name)")
    add_evolver_args(ev)

    rp = sub.add_parser("report", help="print tasks, accuracies, parameters and the layer pool")
    rp.add_argument("--data-dir", required=True)
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.add_argument("--verify", action="store_true",
                    help="also check the store's invariants (SQLite integrity, array digests, paths' components, "
                         "dataset directories); exit 1 if any is broken")

    sv = sub.add_parser("serve", help="run the gRPC/HTTP server with its evolver process")
    sv.add_argument("--data-dir", required=True)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--grpc-port", type=int, default=50051)
    sv.add_argument("--http-port", type=int, default=8000)
    sv.add_argument("--max-batch-size", type=int, default=64)
    sv.add_argument("--max-delay-ms", type=float, default=2.0)
    sv.add_argument("--max-message-bytes", type=int, default=64 << 20)
    sv.add_argument("--max-upload-bytes", type=int, default=512 << 20)
    sv.add_argument("--max-archive-bytes", type=int, default=2 << 30, help="uncompressed archive size cap")
    sv.add_argument("--max-concurrent-uploads", type=lambda t: _count_arg(t, 1, "an integer >= 1"), default=2,
                    help="uploads received or ingested at once; one more is refused with 429")
    sv.add_argument("--max-concurrent-requests", type=lambda t: _count_arg(t, 1, "an integer >= 1"), default=512,
                    help="requests handled at once over gRPC and HTTP together (health probes and metrics "
                         "not counted); one more is refused with 429 / RESOURCE_EXHAUSTED")
    sv.add_argument("--no-cross-task-batching", dest="cross_task_batching", action="store_false",
                    help="batch requests per served path only (default: requests of paths that differ only in "
                         "their heads share one forward call)")
    sv.add_argument("--max-queued-images", type=lambda t: _count_arg(t, 1, "an integer >= 1"), default=16384,
                    help="most images queued for the forward pass; more is refused with 429 / RESOURCE_EXHAUSTED")
    sv.add_argument("--no-deadline-admission", dest="deadline_admission", action="store_false",
                    help="queue a request with a deadline even when the queued work outlasts it (default: refuse "
                         "it at once with RESOURCE_EXHAUSTED, as it would expire unrun)")
    sv.add_argument("--admin-token", default=os.environ.get("MU2NET_ADMIN_TOKEN"),
                    help="bearer token required by upload/delete (default: $MU2NET_ADMIN_TOKEN; none: open)")
    sv.add_argument("--read-token", action="append", type=_read_token_arg, default=[], metavar="GROUP=TOKEN",
                    help="bearer token that lists, reads and classifies the private tasks of ACL group GROUP "
                         "(repeatable); with an admin token or read tokens, private tasks are invisible "
                         "(404) to every other caller")
    sv.add_argument("--no-evolver", action="store_true",
                    help="serve only (another process evolves); with --repository: a replica")
    sv.add_argument("--repository", default=None, metavar="URL",
                    help="model repository (a directory or an fsspec URL such as s3://bucket/prefix): with the "
                         "evolver, every system version is also written there for replicas; with --no-evolver, "
                         "this server is a replica serving the repository's latest version, mirrored into "
                         "--data-dir (an empty directory of its own)")
    sv.add_argument("--keep-versions", type=lambda t: _count_arg(t, 1, "an integer >= 1"), default=None,
                    metavar="N", help="system versions the evolver host keeps readable in --repository, for "
                                      "lagging replicas and rollbacks (default 2; older ones and the arrays only "
                                      "they use are deleted)")
    sv.add_argument("--ingest-url", default=None, metavar="URL",
                    help="a replica forwards uploads, deletes, evolve and rollback requests to this HTTP base URL (the "
                         "evolver host's server); without it a replica refuses them with 503")
    sv.add_argument("--tls-cert", help="PEM certificate chain: serve gRPC and HTTPS over TLS (with --tls-key)")
    sv.add_argument("--tls-key", help="PEM private key of --tls-cert")
    sv.add_argument("--tls-client-ca", help="PEM CA: require client certificates it signed (mutual TLS)")
    sv.add_argument("--no-continual", action="store_true",
                    help="stop evolving once every task has --iterations task iterations (default: keep "
                         "evolving while idle, least recently improved task first)")
    sv.add_argument("--compute-threads", type=_compute_threads_arg, default=None, metavar="N",
                    help="XLA CPU compute threads of the server process (default: CPUs - 1, at least 1, leaving "
                         "a core to the gRPC/HTTP threads; 0: one per CPU, JAX's default)")
    sv.add_argument("--task", action="append", type=_task_arg, default=[], metavar="NAME=SOURCE",
                    help="add a task before serving (as in evolve); repeatable")
    sv.add_argument("--private", action="append", default=[], metavar="NAME")
    add_evolver_args(sv)

    for name, help_ in (("upload", "upload a labeled dataset as a new task"), ("classify", "classify images"),
                        ("tasks", "list tasks"), ("status", "server and evolver status"),
                        ("wake", "resume continual evolution of a paused or pinned task"),
                        ("rollback", "serve a task's path of an earlier retained system version and pin it "
                                     "(the server needs --repository)")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--grpc", default="127.0.0.1:50051", help="gRPC target host:port")
        c.add_argument("--http", default="http://127.0.0.1:8000", help="HTTP base URL")
        c.add_argument("--token", default=os.environ.get("MU2NET_ADMIN_TOKEN"))
        c.add_argument("--json", action="store_true")
        c.add_argument("--verbose", action="store_true", help="log at INFO (e.g. each HTTP request)")
        if name == "upload":
            c.add_argument("name")
            c.add_argument("dataset", help="ImageFolder directory, zip/tar archive or .npz file")
            c.add_argument("--private", action="store_true")
            c.add_argument("--wait", action="store_true", help="wait until the task serves its first answer "
                                                               "(progress shown)")
            c.add_argument("--accuracy", type=_fraction_arg, default=None, metavar="A",
                           help="with --wait (implied): then wait until its test accuracy is >= A (in [0, 1])")
            c.add_argument("--timeout", type=float, default=None, help="seconds to wait at most, in all")
        elif name == "classify":
            c.add_argument("task")
            c.add_argument("images", nargs="+", help="image files")
            c.add_argument("--top-k", type=int, default=1)
        elif name == "wake":
            c.add_argument("task")
        elif name == "rollback":
            c.add_argument("task")
            c.add_argument("--version", type=lambda t: _count_arg(t, 0, "an integer >= 0"), default=None,
                           help="the retained system version to go back to (default: the newest retained one "
                                "with another path of the task)")
    return parser


#: Commands that talk to a server: they log at WARNING unless ``--verbose``.
CLIENT_COMMANDS = ("upload", "classify", "tasks", "status", "wake", "rollback")


def _fraction_arg(text: str) -> float:
    """argparse type of ``upload --accuracy``: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: a fraction in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value}; allowed: a fraction in [0, 1]")
    return value


def _check_evolver_config(args: argparse.Namespace, command: str) -> None:
    """Exits with a usage error naming the bad value if the evolver flags do not combine
    (e.g. ``--lineage-children`` above ``--children`` x ``--halving``). Creates no JAX backend."""
    try:
        evolver_config(args)
    except ValueError as e:
        raise SystemExit(f"mu2net {command}: error: {e}") from None


def cmd_evolve(args: argparse.Namespace) -> int:
    from mu2net.evolver import Evolver
    from mu2net.ingest import add_task

    _check_evolver_config(args, "evolve")
    from mu2net.server.compute import split_cpu_devices
    from mu2net.store import EvolverRunning, Store, TaskExists, evolver_lock

    # before anything creates the JAX backend (ensure_root may initialise a root model)
    split_cpu_devices(args.cpu_devices)
    try:
        lock = evolver_lock(args.data_dir)  # noqa: F841 (held until the process exits)
    except EvolverRunning as e:
        print(f"mu2net evolve: error: {e}", file=sys.stderr)
        return 2
    store = Store(args.data_dir)
    ensure_root(store, args)
    groups = dict(g.split("=", 1) for g in args.acl_group)
    _add_tasks(store, args.task, args.private, groups, add_task, TaskExists)
    try:
        ray = ray_children(args)
    except Exception as e:  # no cluster there, ray not installed (the "ray" extra), or another ray version
        print(f"mu2net evolve: error: --ray-address {args.ray_address!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    evolver = Evolver(store, evolver_config(args), progress=not args.quiet, ray=ray)
    print(f"training children on {len(evolver.devices)} device(s): "
          f"{', '.join(str(d) for d in evolver.devices)}"
          + (f", children on the Ray cluster at {args.ray_address}" if ray else ""), file=sys.stderr)
    evolver.run(args.iterations)
    print(format_report(report(store)))
    return 0


def _add_tasks(store: Any, tasks: list[tuple[str, str]], private: list[str], groups: dict[str, str],
               add_task: Any, exists: type[Exception]) -> None:
    known = {t.name for t in store.list_tasks()}
    for name, source in tasks:
        if name in known:
            print(f"task {name!r} already in the store; continuing it", file=sys.stderr)
            continue
        try:
            add_task(store, name, source, private=name in private, acl_group=groups.get(name))
        except exists:
            continue
        print(f"added task {name!r} from {source}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from mu2net.ingest import add_task
    from mu2net.server import ServiceConfig, serve
    from mu2net.server.compute import limit_compute_threads
    from mu2net.store import Store, TaskExists

    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        raise SystemExit("mu2net serve: error: TLS needs both --tls-cert and --tls-key (and --tls-client-ca only "
                         "with them)")
    for f in filter(None, (args.tls_cert, args.tls_key, args.tls_client_ca)):
        if not os.path.isfile(f):
            raise SystemExit(f"mu2net serve: error: TLS file {f!r} does not exist")
    tls = (args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    replica = bool(args.no_evolver and args.repository)
    if args.ingest_url is not None and not replica:
        raise SystemExit("mu2net serve: error: --ingest-url is for a replica (--no-evolver --repository URL)")
    if args.ingest_url is not None and not args.ingest_url.startswith(("http://", "https://")):
        raise SystemExit(f"mu2net serve: error: --ingest-url {args.ingest_url!r} must be an http:// or https:// URL")
    if args.keep_versions is not None and (replica or not args.repository):
        raise SystemExit("mu2net serve: error: --keep-versions is for the evolver host's --repository (a replica "
                         "keeps no versions)")
    if replica and args.task:
        raise SystemExit("mu2net serve: error: a replica serves the repository's tasks; give --task to the evolver "
                         "host's server")
    if args.repository is not None:
        from mu2net.repository import Repository

        try:
            Repository(args.repository)
        except Exception as e:  # a malformed URL, a protocol whose fsspec package is not installed
            raise SystemExit(f"mu2net serve: error: --repository {args.repository!r}: {e}") from None
    if not args.no_evolver:  # here, not in the evolver process's restarts (the server never imports the evolver)
        later = (args.later_children or args.children) * args.halving
        if args.lineage_children > later:
            raise SystemExit(f"mu2net serve: error: --lineage-children {args.lineage_children} is more than the "
                             f"children of a later generation ({later}: --later-children or --children, times "
                             f"--halving)")
        if args.ray_address is not None:
            import importlib.util

            if importlib.util.find_spec("ray") is None:  # (the evolver process connects; not imported here)
                raise SystemExit("mu2net serve: error: --ray-address needs the ray package: pip install "
                                 "'mu2net[ray]'")
    # before anything creates the JAX backend (ensure_root may initialise a root model)
    limit_compute_threads(args.compute_threads)
    store = Store(args.data_dir)
    if replica:
        from mu2net.store import StoreError

        try:
            store.make_mirror(args.repository)
        except StoreError as e:
            raise SystemExit(f"mu2net serve: error: {e}") from None
    elif store.mirror_of() is not None:
        raise SystemExit(f"mu2net serve: error: {args.data_dir} is a replica's mirror of {store.mirror_of()!r}: serve "
                         f"it with --no-evolver --repository, or give the evolver host a data directory of its own")
    else:
        ensure_root(store, args, serving=True)
        _add_tasks(store, args.task, args.private, {}, add_task, TaskExists)
    store.close()
    if args.read_token and not args.admin_token:
        raise SystemExit("mu2net serve: error: --read-token needs --admin-token (or $MU2NET_ADMIN_TOKEN): without "
                         "one, upload and delete are open to anyone, private tasks included")
    config = ServiceConfig(max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
                           max_upload_bytes=args.max_upload_bytes, max_message_bytes=args.max_message_bytes,
                           max_archive_bytes=args.max_archive_bytes, max_queued_images=args.max_queued_images,
                           deadline_admission=args.deadline_admission, max_concurrent_uploads=args.max_concurrent_uploads,
                           max_concurrent_requests=args.max_concurrent_requests,
                           cross_task_batching=args.cross_task_batching,
                           admin_token=args.admin_token, read_tokens=dict(args.read_token),
                           replica=replica, ingest_url=args.ingest_url)
    return asyncio.run(serve(args.data_dir, args.host, args.grpc_port, args.http_port, config,
                             None if args.no_evolver else evolver_argv(args), tls,
                             repository=args.repository, keep_versions=args.keep_versions or 2))


def _client(args: argparse.Namespace) -> Any:
    from mu2net_client import Client

    return Client(args.grpc, args.http, token=args.token)


def _task_json(task: Any) -> dict[str, Any]:
    doc: dict[str, Any] = dataclasses.asdict(task)
    return doc


def _task_line(task: Any) -> str:
    acc = task.metrics.get("test_accuracy")
    return f"task {task.name}: {task.state} (system version {task.system_version}" + \
        ("" if acc is None else f", test accuracy {acc:.4f}") + ")"


def cmd_upload(args: argparse.Namespace) -> int:
    import time

    started = time.monotonic()
    with _client(args) as client:
        print(f"uploading {args.dataset} as task {args.name!r}...", file=sys.stderr)
        task = client.upload(args.name, args.dataset, private=args.private)
        if args.wait or args.accuracy is not None:
            task = client.wait_until_serving(args.name, timeout=args.timeout)
            if args.accuracy is not None:
                left = None if args.timeout is None else max(0.0, args.timeout - (time.monotonic() - started))
                task = client.wait_until(args.name, args.accuracy, timeout=left)
    print(json.dumps(_task_json(task), indent=2) if args.json else _task_line(task))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from pathlib import Path

    encoded = [Path(p).read_bytes() for p in args.images]
    with _client(args) as client:
        result = client.classify(args.task, encoded, top_k=args.top_k)
    if args.json:
        print(json.dumps({"system_version": result.system_version, "path_id": result.path_id,
                          "results": [r.__dict__ for r in result.results]}, default=list, indent=2))
    else:
        for path, r in zip(args.images, result.results):
            print(path, " ".join(f"{l}:{s:.4f}" for l, s in zip(r.labels, r.scores)))
        print(f"(system version {result.system_version}, path {result.path_id[:8]})")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        tasks = client.tasks()
    if args.json:
        print(json.dumps([_task_json(t) for t in tasks], indent=2))
    for t in [] if args.json else tasks:
        acc = t.metrics.get("test_accuracy")
        print(f"{t.name:<20}{t.state:<10}{len(t.labels):>4} classes  v{t.system_version:<5}"
              f"{'' if acc is None else f'test acc {acc:.4f}'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from mu2net.server.page import age, evolver_line

    with _client(args) as client:
        system = client.system()
        tasks = client.tasks()
    now = time.time()
    states: dict[str, int] = {}
    for t in tasks:
        states[t.state] = states.get(t.state, 0) + 1
    evolver = system.get("evolver") or {}
    per_task = [{"name": t.name, "state": t.state, "test_accuracy": t.metrics.get("test_accuracy"),
                 "system_version": t.system_version, "improved_at": t.improved_at,
                 "seconds_since_improvement": None if t.improved_at is None else round(now - t.improved_at, 1),
                 "paused": t.paused, "stale_iterations": t.stale_iterations} for t in tasks]
    status = {"system_version": system["system_version"], "store_version": system["store_version"],
              "total_params": system["total_params"], "tasks": states,
              "last_load_error": system["last_load_error"]}
    if args.json:
        print(json.dumps({**status, "evolver": evolver, "per_task": per_task}, indent=2))
        return 0
    lines = [f"{k}: {v}" for k, v in status.items()] + [evolver_line(evolver, now)]
    for row in per_task:
        acc, since = row["test_accuracy"], row["seconds_since_improvement"]
        lines.append(f"  {row['name']:<20}{row['state']:<10}"
                     f"{'test acc -     ' if acc is None else f'test acc {acc:.4f}'}  "
                     f"{'never improved' if since is None else f'improved {age(since)} ago':<20}"
                     f"{'  paused' if row['paused'] else ''}")
    print("\n".join(lines))
    return 0


def cmd_wake(args: argparse.Namespace) -> int:
    with _client(args) as client:
        task = client.evolve(args.task)
    print(json.dumps(_task_json(task), indent=2) if args.json else
          f"task {task.name}: {task.state}, {'paused' if task.paused else 'evolving'} "
          f"(system version {task.system_version})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with _client(args) as client:
        task = client.rollback(args.task, args.version)
    back = task.rolled_back_to or {}
    print(json.dumps(_task_json(task), indent=2) if args.json else
          f"task {task.name}: serving its path {back.get('path_id')} of system version {back.get('system_version')} "
          f"again (now system version {task.system_version}); pinned until `mu2net wake {task.name}`")
    return 0


def report(store: Any) -> dict[str, Any]:
    """Per task: accuracies, path length, parameters, parent tasks, knowledge transfer;
    and the pool totals (the paper's Table 7 / Figure 2 columns).

    ``parent_tasks``: the other tasks the path inherits from (any task that trained one of
    its components or their ancestors); ``shares_components_of``: the tasks whose frozen
    components it shares; ``knowledge_transfer``: the share of the path's training steps,
    over all ancestors, spent on each task (Section 5)."""
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
            # tasks it inherits knowledge from: any other task that trained one of its
            # components or their ancestors; and the tasks whose frozen components it shares
            parent_tasks = sorted(k for k in steps if k != t.name)
            shared_from = sorted({comps[c].task for c in path.component_ids if comps[c].task not in (None, t.name)})
            row.update({
                "path_id": path.id, "score": path.score,
                "validation_accuracy": path.metrics.get("validation_accuracy"),
                "test_accuracy": path.metrics.get("test_accuracy"),
                "path_length": len(path.component_ids),
                "transformer_blocks": path.architecture.num_blocks,
                "activated_params": sum(comps[c].num_params for c in path.component_ids),
                "trainable_params": sum(comps[c].num_params for c in path.component_ids if comps[c].task == t.name),
                "parent_tasks": parent_tasks, "shares_components_of": shared_from,
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

    from mu2net.store import Store, StoreError

    if not (Path(args.data_dir) / "mu2net.sqlite").exists():
        print(f"error: {args.data_dir!r} is not a mu2net store (no mu2net.sqlite)", file=sys.stderr)
        return 2
    store = Store(args.data_dir)
    problems = store.verify() if args.verify else None
    try:
        rep = report(store)
    except (KeyError, StoreError) as e:  # a damaged store: the report needs every path's components
        if problems is None:
            raise
        print(json.dumps({"problems": problems}, indent=2) if args.json else
              "\n".join([f"no report ({type(e).__name__}: {e}); store check:", *(f"  {p}" for p in problems)]))
        return 1
    if args.json:
        print(json.dumps(rep if problems is None else {**rep, "problems": problems}, indent=2))
    else:
        print(format_report(rep))
        if problems is not None:
            print("\n".join(["store check:", *(f"  {p}" for p in problems)]) if problems else "store check: ok")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # client commands print results (and a progress bar); an INFO line per HTTP poll would
    # interleave with them
    quiet = args.command in CLIENT_COMMANDS and not args.verbose
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if quiet:
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from mu2net.datasets import DatasetError

    commands = {"evolve": cmd_evolve, "report": cmd_report, "serve": cmd_serve, "upload": cmd_upload,
                "classify": cmd_classify, "tasks": cmd_tasks, "status": cmd_status, "wake": cmd_wake,
                "rollback": cmd_rollback}
    try:
        return commands[args.command](args)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from mu2net_client import Mu2netError

        if isinstance(e, Mu2netError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

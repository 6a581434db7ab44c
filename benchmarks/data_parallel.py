"""One child's train step on one CPU device against data-parallel over two, side by side.

The evolver's long first child (``--long-data-parallel``,
:func:`mu2net.evolver.training.placement`) splits each batch between the CPU devices
(``--xla_force_host_platform_device_count``, set here before JAX starts) and averages the
gradients; without it the child trains on one device, whose steps get XLA's shared
intra-op thread pool. Measured for the main job's long-child shape (28x28 input, patch 7,
width 64, MLP 128, 4 heads, 4 blocks, 10 classes, every component trainable, batch 64),
the serve root hyperparameters, rounds alternating between: one device, data-parallel
over both, and two independent children at once (one per device, total throughput: the
upper bound of two devices). Compilation excluded.

    python benchmarks/data_parallel.py --out docs/data_parallel.json
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=2"])

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mu2net import components as C  # noqa: E402
from mu2net import hparams as H  # noqa: E402
from mu2net import root as R  # noqa: E402
from mu2net.cli import SERVE_ROOT_HPARAMS  # noqa: E402
from mu2net.evolver.training import placement, traced_hparams, train_step_fn, zeros_like_tree  # noqa: E402


def throughput(device, steps: int, batch_size: int, seed: int, start: threading.Barrier | None = None) -> float:
    """Images/s of ``steps`` train steps of a fresh 4-block child placed on ``device``;
    ``start``: every thread's timed steps begin together (after each compiled its step)."""
    arch, params = R.random_root(C.ViTConfig(28, 7, 64, 128, 4), 4, num_classes=10, seed=seed)
    put, put_batch = placement(device, batch_size)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 255, (4096, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, 10, 4096).astype(np.int32)
    fn = train_step_fn(arch, 0, False)
    suffix = put(jax.tree_util.tree_map(jnp.array, params))
    momentum = put(zeros_like_tree(params))
    mask = put([jnp.asarray(True)] * len(params))
    hp = put(traced_hparams(H.with_defaults(SERVE_ROOT_HPARAMS)))
    total = put(jnp.asarray(float(steps + 5), jnp.float32))
    key = jax.random.PRNGKey(seed)

    def step(i: int) -> None:
        nonlocal suffix, momentum, key
        idx = rng.integers(0, len(y), batch_size)
        key, sub = jax.random.split(key)
        suffix, momentum, _ = fn(suffix, momentum, [], mask, put_batch(x[idx]), put_batch(y[idx]),
                                 put(jnp.asarray(i, jnp.int32)), total, hp, sub)

    for i in range(5):  # compile and warm up
        step(i)
    jax.block_until_ready(suffix)
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    for i in range(steps):
        step(5 + i)
    jax.block_until_ready(suffix)
    return steps * batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    devices = jax.devices()
    if len(devices) < 2:
        raise SystemExit(f"needs 2 devices, JAX has {devices}")
    rounds: dict[str, list[float]] = {"one device": [], "data-parallel over 2 devices": [],
                                      "two children at once, total": []}
    for r in range(args.rounds):
        rounds["one device"].append(throughput(devices[0], args.steps, args.batch_size, r))
        rounds["data-parallel over 2 devices"].append(throughput(devices[:2], args.steps, args.batch_size, r))
        # both children's timed steps start together; the total is their images over the
        # wall time until the slower one ends
        start = threading.Barrier(2)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(throughput, devices[k], args.steps, args.batch_size, r, start) for k in range(2)]
            rates = [f.result() for f in futures]  # re-raises a thread's error
        rounds["two children at once, total"].append(2 * args.steps * args.batch_size
                                                      / max(args.steps * args.batch_size / v for v in rates))
    base = statistics.median(rounds["one device"])
    out = {"command": "python benchmarks/data_parallel.py", "batch_size": args.batch_size, "steps": args.steps,
           "results": {k: {"images_per_second_rounds": [round(v) for v in vs],
                           "median": round(statistics.median(vs)),
                           "ratio_to_one_device": round(statistics.median(vs) / base, 2)}
                       for k, vs in rounds.items()}}
    for k, v in out["results"].items():
        print(f"{k:32s} {v['median']:6d} images/s  {v['ratio_to_one_device']:.2f}x  rounds {v['images_per_second_rounds']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

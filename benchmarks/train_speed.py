"""Child training throughput against a plain optax loop, side by side in one run.

The plain loop trains the same ViT architecture with every component trainable, through
one ``jax.value_and_grad`` over all parameters and a standard optax chain
(clip_by_global_norm(1) + sgd with momentum and a warm-up cosine schedule), with the same
preprocessing and augmentation. The child is trained by the evolver's train step with a
typical mu2Net mask (frozen patch/class/position embeddings and lower blocks; the top
block and the head trainable). Rounds alternate between the two to share the machine's
state; throughput is images/s over the timed steps (compilation excluded). The evolver's
step with every component trainable is measured too (the cost of the step itself).

Also reports compiles per active phase: the number of train-step and predict traces of
one real active phase on digits.

    python benchmarks/train_speed.py --out docs/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mu2net import components as C
from mu2net import hparams as H
from mu2net import paths as P
from mu2net import root as R
from mu2net.evolver.augment import augment
from mu2net.evolver.training import traced_hparams, train_step_fn, zeros_like_tree


def plain_step_fn(arch: P.Architecture, total_steps: int, hp: dict):
    sched = optax.warmup_cosine_decay_schedule(0.0, float(hp["learning_rate"]),
                                               max(1, int(hp["warmup_ratio"] * total_steps)), total_steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(sched, momentum=float(hp["momentum"])))

    @jax.jit
    def step(params, opt_state, images, labels, hpt, rng):
        x = augment(P.preprocess(images, arch.config.image_size), hpt, rng)

        def loss_fn(p):
            logits = P.forward(arch, p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, step


def measure(fn, steps: int, batch_size: int) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return steps * batch_size / (time.perf_counter() - t0)


def compiles_per_phase() -> dict:
    from mu2net.evolver import Evolver, EvolverConfig, TrainBudget
    from mu2net.root import init_root
    from mu2net.ingest import add_task
    from mu2net.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        arch, params = R.random_root(C.ViTConfig(28, 4, 64, 128, 4), 0)
        init_root(store, arch, params, {"mu": 0.3, "flip": False})
        add_task(store, "digits", "builtin:digits")
        cfg = EvolverConfig(generations=4, children=4, budget=TrainBudget(1, 256, 64))
        before = dict(P.TRACES.counts)
        ev = Evolver(store, cfg, progress=False)
        ev.run(1)
        train = P.TRACES.counts.get("train_step", 0) - before.get("train_step", 0)
        pred = P.TRACES.counts.get("predict", 0) - before.get("predict", 0)
        return {"children": cfg.generations * cfg.children, "train_step_compiles": train, "predict_compiles": pred}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="docs/train_speed.json")
    args = ap.parse_args()

    config = C.ViTConfig(28, 4, args.width, 2 * args.width, 4)
    arch, params = R.random_root(config, args.blocks, seed=0, num_classes=10)
    params = jax.device_put(params)
    hp = H.with_defaults({"flip": False, "crop_area_min": 0.5})
    hpt = traced_hparams(hp)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 255, (args.batch_size, 28, 28, 1), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, args.batch_size).astype(np.int32))
    key = jax.random.PRNGKey(0)

    # mu2Net child: embeddings and lower blocks frozen, top block and head trainable
    mask = tuple([False] * (len(arch.kinds) - 2) + [True, True])
    first = mask.index(True)
    child_step = train_step_fn(arch, first, False)
    prefix, suffix = list(params[:first]), list(params[first:])
    state = {"t": jax.tree_util.tree_map(jnp.array, suffix), "m": zeros_like_tree(suffix)}
    suffix_mask = [jnp.asarray(m) for m in mask[first:]]
    total = jnp.asarray(10_000.0)

    def child():
        state["t"], state["m"], loss = child_step(state["t"], state["m"], prefix, suffix_mask, images, labels,
                                                  jnp.asarray(5, jnp.int32), total, hpt, key)
        return loss

    # the same train step with every component trainable: the cost of our step itself
    full_step = train_step_fn(arch, 0, False)
    fstate = {"t": jax.tree_util.tree_map(jnp.array, list(params)), "m": zeros_like_tree(list(params))}
    full_mask = [jnp.asarray(True)] * len(arch.kinds)

    def child_full():
        fstate["t"], fstate["m"], loss = full_step(fstate["t"], fstate["m"], [], full_mask, images, labels,
                                                   jnp.asarray(5, jnp.int32), total, hpt, key)
        return loss

    tx, plain_step = plain_step_fn(arch, 10_000, hp)
    pstate = {"p": jax.tree_util.tree_map(jnp.array, list(params))}
    pstate["o"] = tx.init(pstate["p"])

    def plain():
        pstate["p"], pstate["o"], loss = plain_step(pstate["p"], pstate["o"], images, labels, hpt, key)
        return loss

    results = {"child": [], "plain": [], "child_all_trainable": []}
    for _ in range(args.rounds):
        results["plain"].append(measure(plain, args.steps, args.batch_size))
        results["child"].append(measure(child, args.steps, args.batch_size))
        results["child_all_trainable"].append(measure(child_full, args.steps, args.batch_size))
    child_ips, plain_ips = float(np.median(results["child"])), float(np.median(results["plain"]))
    out = {"config": vars(args), "child_images_per_second": child_ips, "plain_images_per_second": plain_ips,
           "ratio": child_ips / plain_ips,
           "all_trainable_ratio": float(np.median(results["child_all_trainable"])) / plain_ips, "rounds": results, "devices": [str(d) for d in jax.devices()],
           "compiles_per_active_phase": compiles_per_phase()}
    print(json.dumps(out, indent=2))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

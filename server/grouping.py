"""Cross-task batching: one forward call for requests of paths that share their trunk.

mu2Net's paths share frozen, immutable components across tasks. When many tasks each get a
few requests, batching per path runs every request's whole path at a batch of one. Here the
batcher (:mod:`mu2net.server.batcher`) also merges requests of *different* paths whose
components are the same up to the head (their *trunk*: every component but the last),
in one snapshot version: the trunk runs once on the concatenated batch, then every distinct
head of the batch runs on the trunk's output in one compiled call (the heads unrolled in
one jitted function, grouped by class count).

Exactness. Every request's probabilities equal, bit for bit, its own path's forward
(:func:`mu2net.paths.probabilities_fn`) run on the same padded batch. Two measured facts
make this hold on XLA's CPU backend (``tests/test_grouping.py`` checks the exactness and
both facts on every run): splitting a jitted forward at a component boundary does not
change its results, and at a fixed batch size a row's result depends on that row alone,
not on its position or on the other rows. What does change results is the batch size itself (a matmul of 1 row and one
of 64 rows differ in the last bit), so every part of a group runs at the group's padded
batch size: each head runs on all the trunk's rows and keeps its own. A head is a
LayerNorm and one small dense layer, so that costs little; branches with blocks of their
own would cost a whole block per row, which is why only paths that differ in their heads
alone are grouped. A vmapped (batched) head step is not used: it was not bit-identical at
a batch of 64 (docs/benchmarks.md, section "Cross-task batching").

Compiles are bounded: trunks by architecture and padded batch size (the batch buckets of
:func:`mu2net.server.snapshot.bucket_sizes`), head steps by class count, number of heads
padded by :func:`head_slots` (a padding slot repeats the last head) and batch size. They are
counted in :data:`mu2net.paths.TRACES` (``grouped_trunk``, ``grouped_heads``; traces in this
process, re-traces included).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mu2net import components as C
from mu2net import paths as P

#: Jitted ``(trunk params, images uint8 [B,H,W,C]) -> activations [B,T,D] float32``.
TrunkFn = Callable[[Sequence[Any], Any], jax.Array]
#: Jitted ``(head params x G, activations [B,T,D]) -> probabilities [G,B,classes] float32``.
HeadsFn = Callable[[Sequence[Any], Any], jax.Array]


def trunk_key(path: P.Path) -> tuple[str, ...]:
    """The components a path shares with the paths it may be batched with: all but its head."""
    return path.component_ids[:-1]


@functools.lru_cache(maxsize=256)
def trunk_fn(arch: P.Architecture) -> TrunkFn:
    """The compiled trunk of ``arch`` (preprocessing and every component but the head): the
    same :func:`mu2net.paths.forward_prefix` as a path's own forward. ``arch`` is taken with
    ``num_classes`` 1, so paths of any class count share one function."""

    def trunk(params: Sequence[Any], images: Any) -> jax.Array:
        P.TRACES.hit("grouped_trunk")
        x = P.preprocess(images, arch.config.image_size)
        return P.forward_prefix(arch, params, x, len(arch.kinds) - 1)

    return jax.jit(trunk)


@functools.lru_cache(maxsize=1024)
def heads_fn(config: C.ViTConfig, num_classes: int, count: int) -> HeadsFn:
    """``count`` heads of ``num_classes`` classes, each on every row of the trunk's output,
    unrolled in one compiled function (softmax as in :func:`mu2net.paths.probabilities_fn`)."""

    def heads(params: Sequence[Any], x: Any) -> jax.Array:
        P.TRACES.hit("grouped_heads")
        return jnp.stack([jax.nn.softmax(C.apply_component(C.HEAD, config, p, x, num_classes), axis=-1)
                          for p in params])

    return jax.jit(heads)


@functools.lru_cache(maxsize=256)
def trunk_fn_of(arch: P.Architecture) -> TrunkFn:
    """:func:`trunk_fn` of a path's own architecture (one cache lookup per batch, instead of
    building and validating the class-count-free architecture each time)."""
    return trunk_fn(P.Architecture(arch.config, arch.kinds, 1))


def head_slots(count: int) -> int:
    """Heads per compiled head step for ``count`` distinct heads: the next power of two up to
    8, then the next multiple of 8 (so at most 7 padding slots: 36 heads run as 40, not 64)."""
    if count > 8:
        return -(-count // 8) * 8
    slots = 1
    while slots < count:
        slots *= 2
    return slots


def slot_counts(most: int) -> list[int]:
    """Every :func:`head_slots` value for 1..``most`` heads, ascending."""
    return sorted({head_slots(k) for k in range(1, most + 1)})


def grouped_probabilities(members: Sequence[tuple[Any, int]], images: np.ndarray) -> list[np.ndarray]:
    """Probabilities of a batch whose requests' paths share one trunk.

    Args:
      members: per request, its :class:`mu2net.server.snapshot.ServedPath` and its row
        count; rows are consecutive in ``images``, in this order.
      images: the requests' images concatenated and padded, ``[B, H, W, C] uint8`` (B a
        batch bucket).

    Returns:
      Per request, ``[rows, classes] float32`` probabilities, bit-identical to its own
      path's forward on ``images``.

    Raises:
      ValueError: if the paths do not share one trunk.
    """
    first = members[0][0]
    trunk = trunk_key(first.path)
    if any(trunk_key(sp.path) != trunk for sp, _ in members):
        raise ValueError("cross-task batching needs paths that differ in their heads only")
    arch = first.path.architecture
    activations = trunk_fn_of(arch)(first.params[:-1], images)
    # distinct heads in first-seen order, by class count: (count -> path ids, their params)
    slot: dict[str, tuple[int, int]] = {}
    by_classes: dict[int, list[Any]] = {}
    for sp, _ in members:
        pid = sp.path.id
        if pid not in slot:
            c = sp.path.architecture.num_classes
            heads = by_classes.setdefault(c, [])
            slot[pid] = (c, len(heads))
            heads.append(sp.params[-1])
    outputs: dict[int, np.ndarray] = {}
    for c, heads in by_classes.items():
        padded = heads + [heads[-1]] * (head_slots(len(heads)) - len(heads))
        outputs[c] = np.asarray(heads_fn(arch.config, c, len(padded))(padded, activations))
    result, offset = [], 0
    for sp, rows in members:
        c, g = slot[sp.path.id]
        result.append(outputs[c][g, offset:offset + rows])
        offset += rows
    return result


#: (function key, batch size) pairs :func:`warm` has run in this process: a swap warms only
#: what no earlier swap did
_warmed: set[tuple[Any, ...]] = set()
_warmed_lock = threading.Lock()


def warm(paths: Sequence[Any], buckets: Sequence[int]) -> int:
    """Compiles the grouped functions that batches of these served paths can use, at every
    batch bucket, so the first grouped batch does not compile on the batcher thread: for
    each trunk shared by two or more of ``paths``, its trunk and the head steps of every
    slot count (:func:`head_slots`) a batch of that bucket can need (at most as many heads
    as the paths sharing it, per class count, and as the bucket's rows). Functions already
    run at a bucket by an earlier call are skipped. Returns the number of (function, batch
    size) pairs run."""
    sharing: dict[tuple[Any, ...], list[Any]] = {}
    for sp in paths:  # a batch holds one image shape
        sharing.setdefault((trunk_key(sp.path), tuple(sp.task.image_shape)), []).append(sp)
    runs = 0
    for group in sharing.values():
        if len(group) < 2:
            continue
        first = group[0]
        arch = first.path.architecture
        h, w, c = first.task.image_shape
        counts: dict[int, int] = {}
        for sp in group:
            counts[sp.path.architecture.num_classes] = counts.get(sp.path.architecture.num_classes, 0) + 1
        trunk = P.Architecture(arch.config, arch.kinds, 1)
        for b in buckets:
            activations = None
            for classes, n in counts.items():
                head = next(sp.params[-1] for sp in group if sp.path.architecture.num_classes == classes)
                for slots in slot_counts(min(n, b)):  # a batch of b rows holds at most b requests
                    key: tuple[Any, ...] = ("heads", arch.config, classes, slots, b)
                    if key in _warmed:
                        continue
                    if activations is None:
                        activations = trunk_fn(trunk)(first.params[:-1], np.zeros((b, h, w, c), np.uint8))
                    np.asarray(heads_fn(arch.config, classes, slots)([head] * slots, activations))
                    runs += 1
                    with _warmed_lock:
                        _warmed.add(key)
            done = ("trunk", trunk, (h, w, c), b)
            if done not in _warmed:
                if activations is None:
                    np.asarray(trunk_fn(trunk)(first.params[:-1], np.zeros((b, h, w, c), np.uint8)))
                runs += 1
                with _warmed_lock:
                    _warmed.add(done)
    return runs

"""Cross-task batching (server/grouping.py, server/batcher.py): paths that differ only in
their heads share one forward call, and every request's probabilities equal its own path's
forward on the same padded batch bit for bit; paths that share less are not merged."""

from __future__ import annotations

import asyncio
import types

import jax
import numpy as np
import pytest

from conftest import TINY
from mu2net import components as C
from mu2net import paths as P
from mu2net import root as R
from mu2net.server import grouping as G
from mu2net.server.batcher import Batcher
from mu2net.server.snapshot import ServedPath, bucket_for

BLOCKS = 2


def _served(name: str, shared: list, ids: tuple[str, ...], num_classes: int, head_seed: int) -> ServedPath:
    """A served path over the components ``shared`` (ids ``ids``) with a head of its own,
    non-zero (a new head is zero-initialised, which would make every row equal)."""
    key = jax.random.PRNGKey(head_seed)
    head = C.init_component(C.HEAD, TINY, key, num_classes)
    head = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(key, a.shape), head)
    kinds = (C.PATCH_EMBEDDING, C.CLASS_TOKEN, C.POSITION_EMBEDDING) + (C.TRANSFORMER_BLOCK,) * BLOCKS + (C.HEAD,)
    arch = P.Architecture(TINY, kinds, num_classes)
    path = P.Path(id=name, task=name, component_ids=ids + (f"head-{name}",), architecture=arch, hparams={})
    return ServedPath(task=types.SimpleNamespace(image_shape=(8, 8, 1)), path=path,  # type: ignore[arg-type]
                      params=tuple(jax.device_put(p) for p in [*shared, head]), version=1)


@pytest.fixture(scope="module")
def pool():
    """Paths over two random trunks: a, b (10 classes) and c (2 classes) share trunk 1
    whole; d shares trunk 1's embeddings but has blocks of its own; e shares nothing."""
    _, one = R.random_root(TINY, BLOCKS, seed=1)
    _, two = R.random_root(TINY, BLOCKS, seed=2)
    ids1 = tuple(f"t1-{i}" for i in range(3 + BLOCKS))
    ids2 = tuple(f"t2-{i}" for i in range(3 + BLOCKS))
    return {
        "a": _served("a", one[:-1], ids1, 10, 11), "b": _served("b", one[:-1], ids1, 10, 12),
        "c": _served("c", one[:-1], ids1, 2, 13),
        **{f"k{i}": _served(f"k{i}", one[:-1], ids1, 10, 20 + i) for i in range(5)},  # more 10-class heads
        "d": _served("d", one[:3] + two[3:-1], ids1[:3] + ids2[3:], 10, 14),
        "e": _served("e", two[:-1], ids2, 10, 15),
    }


def _own(sp: ServedPath, images: np.ndarray) -> np.ndarray:
    return np.asarray(P.probabilities_fn(sp.path.architecture)(sp.params, images))


@pytest.mark.parametrize("rows", [(1, 1, 1), (3, 1, 2), (1, 5, 2, 6), (20, 11, 33),
                                  (2, 1, 1, 3, 1, 2, 1, 4, 1, 2)])
def test_grouped_probabilities_equal_each_paths_own_forward_bit_for_bit(pool, rows):
    # a repeated: two requests of one task in the group; the last case has 7 distinct 10-class
    # heads (8 slots: a padding slot) and a 2-class one
    names = ["a", "b", "c", "a", "k0", "k1", "k2", "k3", "k4", "b"][:len(rows)]
    total = sum(rows)
    padded = bucket_for(total, 64)
    rng = np.random.default_rng(total)
    images = rng.integers(0, 256, (padded, 8, 8, 1), dtype=np.uint8)
    images[total:] = 0
    members = [(pool[n], r) for n, r in zip(names, rows)]
    parts = G.grouped_probabilities(members, images)
    offset = 0
    for (sp, r), got in zip(members, parts):
        want = _own(sp, images)[offset:offset + r]
        assert got.shape == (r, sp.path.architecture.num_classes)
        np.testing.assert_array_equal(got, want)  # bit for bit, at the same padded batch
        offset += r
    # the check is not vacuous: different heads give different probabilities, and different
    # rows of one request differ (a wrong row offset would not pass by equal rows)
    assert not np.array_equal(parts[0][:1], _own(pool["b"], images)[:1])
    big = max(range(len(rows)), key=lambda i: rows[i])
    if rows[big] > 1:
        assert not np.array_equal(parts[big][0], parts[big][1])


def test_a_rows_result_depends_on_that_row_alone_at_a_fixed_batch_size(pool):
    """The fact cross-task batching's exactness rests on (server/grouping.py): at one batch
    size, a row's probabilities do not change when the other rows change or move."""
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    want = _own(pool["a"], images)
    other = images.copy()
    other[1:] = rng.integers(0, 256, other[1:].shape, dtype=np.uint8)
    np.testing.assert_array_equal(_own(pool["a"], other)[0], want[0])
    perm = rng.permutation(16)
    np.testing.assert_array_equal(_own(pool["a"], images[perm]), want[perm])


def test_paths_with_other_components_than_the_head_are_not_grouped(pool):
    images = np.zeros((4, 8, 8, 1), np.uint8)
    for other in ("d", "e"):  # embeddings only, or nothing, in common
        with pytest.raises(ValueError, match="differ in their heads only"):
            G.grouped_probabilities([(pool["a"], 2), (pool[other], 2)], images)
    assert [G.head_slots(k) for k in (1, 2, 3, 4, 5, 8, 9, 33, 50, 64)] == [1, 2, 4, 4, 8, 8, 16, 40, 56, 64]
    assert G.slot_counts(20) == [1, 2, 4, 8, 16, 24]


def test_the_batcher_merges_one_trunks_tasks_and_keeps_other_paths_and_versions_apart(pool):
    calls: list[tuple[int, int]] = []  # (images, served paths) of each forward call

    async def scenario(requests):
        batcher = Batcher(max_batch_size=64, max_delay_ms=200.0, on_batch=lambda n, k: calls.append((n, k)))
        try:
            return await asyncio.gather(*(batcher.predict(pool[n], x, snapshot_version=v) for n, x, v in requests))
        finally:
            batcher.close()

    rng = np.random.default_rng(0)
    x = {n: rng.integers(0, 256, (k, 8, 8, 1), dtype=np.uint8) for n, k in (("a", 3), ("b", 2), ("c", 4), ("d", 1),
                                                                            ("e", 2))}
    G.warm([pool[n] for n in "abc"], [1, 2, 4, 8, 16, 32, 64])  # compiled before the timed window
    # one trunk, three tasks, one snapshot version: one forward call of 9 images (padded to 16)
    answers = asyncio.run(scenario([("a", x["a"], 5), ("b", x["b"], 5), ("c", x["c"], 5)]))
    assert calls == [(9, 3)]
    batch = np.concatenate([x["a"], x["b"], x["c"], np.zeros((7, 8, 8, 1), np.uint8)])
    offset = 0
    for n, got in zip("abc", answers):
        np.testing.assert_array_equal(got, _own(pool[n], batch)[offset:offset + len(x[n])])
        offset += len(x[n])
    # paths sharing only the embeddings, or nothing, and another snapshot version: apart
    calls.clear()
    answers = asyncio.run(scenario([("a", x["a"], 5), ("d", x["d"], 5), ("e", x["e"], 5), ("b", x["b"], 6)]))
    assert sorted(calls) == [(1, 1), (2, 1), (2, 1), (3, 1)]
    for (n, got) in zip("adeb", answers):
        pad = np.concatenate([x[n], np.zeros((bucket_for(len(x[n]), 64) - len(x[n]), 8, 8, 1), np.uint8)])
        np.testing.assert_array_equal(got, _own(pool[n], pad)[:len(x[n])])
    # with cross-task batching off, one trunk's tasks are batched per path
    calls.clear()

    async def per_path():
        batcher = Batcher(max_batch_size=64, max_delay_ms=200.0, on_batch=lambda n, k: calls.append((n, k)),
                          cross_task=False)
        try:
            return await asyncio.gather(*(batcher.predict(pool[n], x[n], snapshot_version=5) for n in "abc"))
        finally:
            batcher.close()

    asyncio.run(per_path())
    assert sorted(calls) == [(2, 1), (3, 1), (4, 1)]


def test_warm_compiles_shared_trunks_and_head_counts_only(pool):
    G.trunk_fn.cache_clear()
    G.trunk_fn_of.cache_clear()
    G.heads_fn.cache_clear()
    G._warmed.clear()
    assert G.warm([pool["d"], pool["e"]], [1, 2]) == 0  # no trunk is shared by two of them
    before = dict(P.TRACES.counts)
    runs = G.warm([pool[n] for n in "abcde"], [1, 2])
    # trunk 1 (a, b, c): at batch 1 the trunk and one-head steps (10 and 2 classes); at batch 2
    # the trunk, 10-class steps of 1 and 2 heads, a 2-class step of 1
    assert runs == (1 + 1 + 1) + (1 + 2 + 1)
    assert P.TRACES.counts["grouped_trunk"] - before.get("grouped_trunk", 0) == 2  # compiled here, per bucket
    assert P.TRACES.counts["grouped_heads"] - before.get("grouped_heads", 0) == 5
    assert G.warm([pool[n] for n in "abcde"], [1, 2]) == 0  # a later swap warms nothing again
    # a grouped batch of a warmed bucket and head count compiles nothing more
    before = dict(P.TRACES.counts)
    G.grouped_probabilities([(pool["a"], 1), (pool["b"], 1)], np.zeros((2, 8, 8, 1), np.uint8))
    G.grouped_probabilities([(pool["c"], 1)], np.zeros((1, 8, 8, 1), np.uint8))
    assert P.TRACES.counts == before

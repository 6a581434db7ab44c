"""The evolver on real data with a tiny ViT: immutability, privacy, provenance, resumability."""

import subprocess
import sys
import textwrap

import numpy as np

from conftest import TINY_EVOLVER
from mu2net import datasets as D
from mu2net import paths as P
from mu2net.evolver import Evolver, locked_components


def _test_predictions(store, task):
    t = store.get_task(task)
    path = store.best_path(task)
    x, _ = D.read_split(t.dataset_dir, t.splits["test"])
    return P.predict(path.architecture, store.load_params(path.component_ids), x)


def test_immutability_earlier_tasks_predict_bit_identically(tiny_store):
    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")
    first = _test_predictions(tiny_store, "digits")
    first_path = tiny_store.best_path("digits")
    params_before = [dict(p) for p in tiny_store.load_params(first_path.component_ids)]
    for task in ("small", "parity", "small"):
        ev.active_phase(task)
    assert tiny_store.best_path("digits").id == first_path.id
    np.testing.assert_array_equal(_test_predictions(tiny_store, "digits"), first)  # bit-identical
    for a, b in zip(params_before, tiny_store.load_params(first_path.component_ids)):
        for x, y in zip(__import__("jax").tree_util.tree_leaves(a), __import__("jax").tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(x, y)


def test_privacy_and_deletion_of_a_private_task(tiny_store):
    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    assert ev.run(iterations=2) == 6
    comps = {c.id: c for c in tiny_store.list_components()}
    private_ids = {c.id for c in comps.values() if "parity" in c.steps}
    assert private_ids, "the private task trained components of its own"
    for c in comps.values():
        if "parity" in c.steps:
            assert c.acl_group == "parity"
    for task in ("digits", "small"):
        path = tiny_store.best_path(task)
        used = set(path.component_ids)
        assert not used & private_ids
        for cid in used:  # no public component descends from private data
            assert "parity" not in comps[cid].steps and comps[cid].acl_group is None
    # deletion removes every component trained on the private data, files included
    files = {c.params_digest for c in comps.values() if c.id in private_ids}
    assert tiny_store.delete_task("parity") == []
    remaining = {c.id: c for c in tiny_store.list_components()}
    assert not private_ids & set(remaining)
    assert all("parity" not in c.steps for c in remaining.values())
    for d in files:
        assert not (tiny_store.data_dir / "arrays" / d[:2] / f"{d}.npz").exists()
    assert tiny_store.best_path("digits") is not None and tiny_store.best_path("small") is not None


def test_locked_components_are_the_root_and_other_tasks_best_paths(tiny_store):
    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")
    ev.active_phase("small")
    root = set(tiny_store.root_path().component_ids)
    digits, small = (set(tiny_store.best_path(t).component_ids) for t in ("digits", "small"))
    locked = locked_components(tiny_store.list_paths(), "digits")
    assert locked == root | small  # digits' own components keep training in its next phase
    assert locked_components(tiny_store.list_paths(), "small") == root | digits
    assert locked_components(tiny_store.list_paths(), "parity") == root | digits | small
    # digits' second phase: every child clones (retrains) the components only digits uses, so
    # none of them is shared frozen by the path it publishes
    first = tiny_store.best_path("digits")
    for _ in range(3):  # until a phase publishes a better path (the first later one does, seeded)
        best = ev.active_phase("digits")
        if best.id != first.id:
            break
    assert best.id != first.id, "no later digits phase improved on the first"
    assert digits - root - small and not set(best.component_ids) & (digits - root - small)


def test_provenance_counts_steps_per_task(tiny_store):
    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.run(iterations=1)
    comps = {c.id: c for c in tiny_store.list_components()}
    for t in tiny_store.list_tasks():
        path = tiny_store.best_path(t.name)
        head = comps[path.component_ids[-1]]
        assert head.steps.get(t.name, 0) > 0 and head.task == t.name
        assert path.metrics["test_accuracy"] >= 0 and path.architecture.num_blocks >= 1
        assert path.metrics["activated_params"] == sum(comps[c].num_params for c in path.component_ids)


def test_learns_digits_above_chance(tiny_store):
    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    best = ev.active_phase("digits")
    assert best.metrics["validation_accuracy"] > 0.3  # chance is 0.1
    assert tiny_store.get_task("digits").state == "serving"


RESUME = textwrap.dedent("""
    import os, sys, threading
    sys.path.insert(0, {tests!r})
    from conftest import TINY_EVOLVER
    from mu2net.store import Store
    from mu2net.evolver import Evolver, locked_components
    import mu2net.evolver.loop as loop
    store = Store({data!r})
    real = loop.train_child
    calls = [0]
    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == {die_at}:
            os._exit(9)  # killed in the middle of an active phase
        return real(*a, **k)
    loop.train_child = dying
    Evolver(store, TINY_EVOLVER, progress=False).run(2)
""")


def test_killed_evolver_resumes_without_losing_published_state(tiny_store):
    import pathlib

    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")
    published = tiny_store.best_path("digits")
    version = tiny_store.system_version()
    script = RESUME.format(tests=str(pathlib.Path(__file__).parent), data=str(tiny_store.data_dir), die_at=8)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 9, proc.stderr[-2000:]
    from mu2net.store import Store

    store = Store(tiny_store.data_dir)
    # queue order: never served first, then oldest: parity (2 first-answer + 4 children) finished
    # before the kill in the second child of small's first-answer generation
    assert store.system_version() > version
    assert store.get_task("parity").iterations_done == 1
    assert store.get_task("small").iterations_done == 0
    assert store.best_path("digits").id == published.id
    Evolver(store, TINY_EVOLVER, progress=False).run(1)
    assert [t.iterations_done for t in store.list_tasks()] == [1, 1, 1]

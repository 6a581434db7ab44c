"""The evolver on real data with a tiny ViT: immutability, privacy, provenance, resumability."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import TINY_EVOLVER
from mu2net import datasets as D
from mu2net import paths as P
from mu2net.evolver import Evolver, locked_components
from mu2net.store import StoreError


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


def _counting_train_child(monkeypatch):
    """Counts train_child calls (children trained) of the evolver loop."""
    import mu2net.evolver.loop as loop

    calls = [0]
    real = loop.train_child

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_child", counted)
    return calls


@pytest.mark.parametrize("devices", [1, 2])
def test_publish_on_improvement_serves_every_improvement_within_one_phase(tiny_store, monkeypatch, devices):
    import dataclasses

    import jax

    from mu2net.store import Store

    calls = _counting_train_child(monkeypatch)
    served = []  # (version, path id, children trained so far, test predictions of the served path)
    real_publish = Store.publish

    def publish(self, path, new_components, **kw):
        version = real_publish(self, path, new_components, **kw)
        if path is not None:  # what a server loads now: every component must be in the store
            best = self.best_path("digits")
            assert best.id == path.id
            served.append((version, path.id, calls[0], _test_predictions(self, "digits")))
        return version

    monkeypatch.setattr(Store, "publish", publish)
    # two "devices" (the one CPU device twice) run two children at once: children complete out of
    # job order, and the first-answer generation publishes them as they complete
    ev = Evolver(tiny_store, dataclasses.replace(TINY_EVOLVER, generations=3), progress=False,
                 devices=jax.devices()[:1] * devices)
    start = tiny_store.system_version()
    best = ev.active_phase("digits")
    assert len(served) >= 2, "one active phase published only once"
    ids = [p for _, p, *_ in served]
    assert len(set(ids)) == len(ids), "a path was published twice"
    assert [v for v, *_ in served] == list(range(start + 1, start + 1 + len(served)))
    # the first answer is published within the first-answer generation, right after the first child
    # that beats chance (pinned in test_first_answer_reuses_a_served_path_frozen_with_a_new_head)
    assert 1 <= served[0][2] <= TINY_EVOLVER.children
    assert served[-1][1] == best.id and tiny_store.get_task("digits").iterations_done == 1
    history = tiny_store.history("digits")
    assert [h["path_id"] for h in history] == [p for _, p, *_ in served]
    scores = [h["score"] for h in history]
    assert scores == sorted(scores), "a publish never serves a lower-scoring path than the one it replaces"
    assert all(h["test_accuracy"] is not None for h in history)
    np.testing.assert_array_equal(served[-1][3], _test_predictions(tiny_store, "digits"))
    # sample accounting: every child's examples count; a lineage holds at most what was trained
    trained = [h["samples_trained"] for h in history]
    assert trained == sorted(trained) and trained[0] > 0
    assert all(0 < h["lineage_samples"] <= h["samples_trained"] for h in history)
    total = tiny_store.get_task("digits").samples_trained
    assert total >= trained[-1]
    # every trained child counted: at least one cycle of the (256-sample capped) epoch each
    assert total >= calls[0] * TINY_EVOLVER.budget.steps_per_cycle(256) * TINY_EVOLVER.budget.batch_size


def test_first_answer_reuses_a_served_path_frozen_with_a_new_head(tiny_store, monkeypatch):
    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")
    digits = tiny_store.best_path("digits")
    small = tiny_store.get_task("small")
    others = [p for p in tiny_store.list_paths() if p.task != "small"]
    specs = ev.first_answer_specs(small, others)
    assert len(specs) == TINY_EVOLVER.children
    reuse, root = specs[:2]  # deepest served path first, then the random root
    assert reuse.parent.id == digits.id and reuse.sources[:-1] == digits.component_ids[:-1]
    assert reuse.trainable == (False,) * (len(digits.component_ids) - 1) + (True,)
    assert reuse.sources[-1] is None and reuse.architecture.num_classes == small.num_classes
    assert root.parent.id == "root" and all(root.trainable)  # a random root is cloned, with a block
    assert root.architecture.num_blocks == 1 and "insert_block:3" in root.mutations
    import mu2net.evolver.loop as loop

    import threading

    t = tiny_store.get_task("small")
    y_val = D.read_split(t.dataset_dir, t.splits["validation"])[1]
    chance = np.bincount(y_val).max() / len(y_val)
    trained = []  # validation accuracy of each child, in completion order (one device here)
    real_train = loop.train_child
    served = threading.Event()
    waited = []

    def spy(*a, **k):
        # the next child trains while the one before is published; once a child has beaten
        # chance, the next one finishes only after the publish, so the order below is exact
        if any(acc > chance for acc in trained):
            waited.append(served.wait(timeout=120))
        res = real_train(*a, **k)
        trained.append(res.validation_accuracy)
        return res

    monkeypatch.setattr(loop, "train_child", spy)
    first_publish = []
    real = tiny_store.publish

    def publish(path, new_components, **kw):
        if path is not None and not first_publish:
            first_publish.append((len(trained), path))
            served.set()
        return real(path, new_components, **kw)

    monkeypatch.setattr(tiny_store, "publish", publish)
    ev.active_phase("small")
    n, path = first_publish[0]
    assert all(waited), "a child beat chance but was not published before the next child finished"
    # served at once: right after the first first-answer child that beats chance, before the next one completes
    assert 1 <= n <= TINY_EVOLVER.children and all(a <= chance for a in trained[:n - 1]) and trained[n - 1] > chance
    assert path.metrics["validation_accuracy"] == trained[n - 1]
    # what is served is one of the two first-answer children, as specified above
    if path.metrics["mutations"][0] == "reuse_frozen":
        assert path.component_ids[:-1] == digits.component_ids[:-1] and path.parent_id == digits.id
    else:
        assert path.metrics["mutations"][:2] == ["clone_all", "new_head"] and path.parent_id == "root"
        assert not set(path.component_ids) & set(tiny_store.root_path().component_ids)
    assert t.num_classes == 2 and path.metrics["validation_accuracy"] > 0.6  # beats chance (~0.5)


def test_a_random_roots_first_child_trains_one_long_schedule_and_is_published_as_it_improves(tiny_store,
                                                                                              monkeypatch):
    import dataclasses
    import math

    import mu2net.evolver.loop as loop

    cfg = dataclasses.replace(TINY_EVOLVER, generations=1, children=1, first_answer_epochs=3.0,
                              first_answer_max_samples=6 * 256, checkpoint_publish_seconds=0.0)
    ev = Evolver(tiny_store, cfg, progress=False)
    t = tiny_store.get_task("small")
    n_train = len(D.read_split(t.dataset_dir, t.splits["train"])[1])
    per_cycle = cfg.budget.samples_per_cycle(n_train)
    long_cycles = math.ceil(min(3.0 * n_train, 6 * 256) / per_cycle)
    assert long_cycles > cfg.budget.cycles
    (spec,) = ev.first_answer_specs(t, [tiny_store.root_path()], num_train=n_train)
    assert spec.cycles == long_cycles and f"long_schedule:{long_cycles}" in spec.mutations and all(spec.trainable)
    # one long child of the random root however many children a generation has (its repeats
    # would only split the machine); without the split's size (or with epochs 0) the child is short
    wide = Evolver(tiny_store, dataclasses.replace(cfg, children=3), progress=False)
    assert [s.cycles for s in wide.first_answer_specs(t, [tiny_store.root_path()], num_train=n_train)] == [long_cycles]
    assert ev.first_answer_specs(t, [tiny_store.root_path()])[0].cycles is None
    # beside served paths, the random root's long child keeps its place: 2 children and 2 served
    # paths give one frozen reuse of the deepest path and the long child (not two reuses)
    root = tiny_store.root_path()
    served = [dataclasses.replace(root, id=f"served-{i}", task=f"other-{i}", score=0.5 + i / 10) for i in range(2)]
    two = Evolver(tiny_store, dataclasses.replace(cfg, children=2), progress=False)
    reuse, long_child = two.first_answer_specs(t, [*served, root], num_train=n_train)
    assert reuse.parent.id == "served-1" and reuse.cycles is None and "reuse_frozen" in reuse.mutations
    assert long_child.parent.id == "root" and long_child.cycles == long_cycles and all(long_child.trainable)
    # one child: the deepest served path alone (the cheapest first answer); no long schedule: as before
    assert [s.parent.id for s in ev.first_answer_specs(t, [*served, root], num_train=n_train)] == ["served-1"]
    assert [s.parent.id for s in two.first_answer_specs(t, [*served, root])] == ["served-1", "served-0"]
    # --first-answer-blocks: the root's child inserts that many new blocks, all trained
    deep = Evolver(tiny_store, dataclasses.replace(cfg, first_answer_blocks=3), progress=False)
    (spec3,) = deep.first_answer_specs(t, [root], num_train=n_train)
    assert spec3.architecture.num_blocks == 3 and spec3.sources[3:6] == (None,) * 3 and all(spec3.trainable)
    assert [m for m in spec3.mutations if m.startswith("insert_block:")] == ["insert_block:3", "insert_block:4",
                                                                            "insert_block:5"]
    with pytest.raises(ValueError, match="first_answer_blocks must be in 1..max_blocks"):
        dataclasses.replace(cfg, first_answer_blocks=0)
    # --long-validation-ratio: the long child's cycles are sized from the validation split, the
    # schedule's examples stay the same; a ratio that gives less than the budget's cycle changes nothing
    assert spec.cycle_samples is None and spec.budget(cfg.budget).samples_per_cycle(n_train) == per_cycle
    sparse = Evolver(tiny_store, dataclasses.replace(cfg, long_validation_ratio=2.5), progress=False)
    n_val = per_cycle  # 2.5 x a cycle's examples between validations
    (lv,) = sparse.first_answer_specs(t, [root], num_train=n_train, num_validation=n_val)
    schedule = min(3.0 * n_train, 6 * 256)
    assert lv.cycles == max(cfg.first_answer_cycles, math.ceil(schedule / math.ceil(2.5 * n_val)))
    assert per_cycle < lv.cycle_samples <= math.ceil(2.5 * n_val)
    assert lv.cycle_samples == math.ceil(schedule / lv.cycles)  # the same schedule, split evenly
    assert lv.cycles * lv.cycle_samples - schedule < lv.cycles  # not more than rounding over the cap
    assert f"long_schedule:{lv.cycles}x{lv.cycle_samples}" in lv.mutations
    lb = lv.budget(cfg.budget)
    assert lb.cycles == lv.cycles and lb.samples_per_cycle(n_train) == lv.cycle_samples
    assert lb.steps_per_cycle(n_train) == math.ceil(lv.cycle_samples / cfg.budget.batch_size)
    (few,) = sparse.first_answer_specs(t, [root], num_train=n_train, num_validation=1)
    assert few.cycle_samples is None and few.cycles == long_cycles
    with pytest.raises(ValueError, match="long_validation_ratio must be a finite number >= 0"):
        dataclasses.replace(cfg, long_validation_ratio=-1.0)
    assert Evolver(tiny_store, TINY_EVOLVER, progress=False).first_answer_specs(
        t, [tiny_store.root_path()], num_train=n_train)[0].cycles is None

    calls = []
    real_train = loop.train_child
    monkeypatch.setattr(loop, "train_child", lambda *a, **k: calls.append(a[7].cycles) or real_train(*a, **k))
    published = []
    real = tiny_store.publish

    def publish(path, new_components, **kw):
        if path is not None:
            published.append(path)
        return real(path, new_components, **kw)

    monkeypatch.setattr(tiny_store, "publish", publish)
    ev.active_phase("small")
    long = [p for p in published if any(m.startswith("long_schedule:") for m in p.metrics["mutations"])]
    # published while it trained: several checkpoints, each better than the one before, behind
    # more and more of the one schedule's examples
    assert len(long) >= 2
    scores = [p.score for p in long]
    assert scores == sorted(scores) and len(set(scores)) == len(scores)  # each strictly better: ties are not published
    lineage = [p.metrics["lineage_samples"] for p in long]
    assert lineage == sorted(lineage) and lineage[-1] <= long_cycles * per_cycle
    # one schedule, not restarted: checkpoint k's history is a prefix of the next one's
    hist = [p.metrics["history"] for p in long]
    assert all(b[:len(a)] == a for a, b in zip(hist, hist[1:]))
    # each example counted once: the long child's whole schedule plus generation 1's child
    assert calls == [cfg.budget.cycles]  # the long child is not a train_child call
    assert tiny_store.get_task("small").samples_trained == long_cycles * per_cycle + cfg.budget.cycles * per_cycle
    # nothing a superseded checkpoint wrote is left
    assert tiny_store.verify() == []
    assert tiny_store.remove_orphans(min_age_seconds=0)["arrays"] == 0


def test_a_long_child_with_patience_stops_after_validations_without_a_better_score(tiny_store, monkeypatch):
    """EvolverConfig.long_patience: early stopping of the long first child, its best
    checkpoint kept; only the examples it trained are counted."""
    import dataclasses
    import math

    from mu2net.evolver import training

    cfg = dataclasses.replace(TINY_EVOLVER, generations=1, children=1, first_answer_epochs=6.0,
                              first_answer_max_samples=12 * 256, checkpoint_publish_seconds=0.0, long_patience=2)
    with pytest.raises(ValueError, match="long_patience must be >= 0"):
        dataclasses.replace(cfg, long_patience=-1)
    t = tiny_store.get_task("small")
    n_train = len(D.read_split(t.dataset_dir, t.splits["train"])[1])
    per_cycle = cfg.budget.samples_per_cycle(n_train)
    long_cycles = math.ceil(min(6.0 * n_train, 12 * 256) / per_cycle)
    assert long_cycles > 5
    # the long child's validations: better, better, a tie, worse -> 2 without a better score: it
    # stops after its 4th cycle; the generation-1 child validates for real
    scripted = iter([0.6, 0.8, 0.8, 0.7])
    real_validate = training.ChildTraining._validate
    monkeypatch.setattr(training.ChildTraining, "_validate",
                        lambda self: next(scripted, None) or real_validate(self))
    published = []
    real_publish = tiny_store.publish

    def publish(path, new_components, **kw):
        if path is not None:
            published.append(path)
        return real_publish(path, new_components, **kw)

    monkeypatch.setattr(tiny_store, "publish", publish)
    ev = Evolver(tiny_store, cfg, progress=False)
    ev.active_phase("small")
    assert ev.stats["long_stopped_early"] == 1
    long = [p for p in published if any(m.startswith("long_schedule:") for m in p.metrics["mutations"])]
    assert [p.metrics["validation_accuracy"] for p in long] == [0.6, 0.8]  # the tie is not published
    assert long[-1].metrics["lineage_samples"] == 2 * per_cycle
    # 4 of its cycles trained and counted (not its whole schedule), then generation 1's child
    assert tiny_store.get_task("small").samples_trained == 4 * per_cycle + cfg.budget.cycles * per_cycle
    assert tiny_store.verify() == []


def test_a_phase_ends_after_generations_without_a_better_score(tiny_store, monkeypatch):
    """EvolverConfig.generation_patience: a later generation that only ties the population's
    best counts as stale; at the patience the phase ends as a completed iteration."""
    import dataclasses

    from mu2net.evolver import training

    with pytest.raises(ValueError, match="generation_patience must be >= 0"):
        dataclasses.replace(TINY_EVOLVER, generation_patience=-1)
    cfg = dataclasses.replace(TINY_EVOLVER, generations=4, generation_patience=1)
    # every validation of generation g scores by[g]: generation 1 improves on the first answer,
    # generation 2 ties it, so the phase ends there and generation 3 never starts
    by = {0: 0.5, 1: 0.6, 2: 0.6, 3: 0.9, 4: 0.9}
    seen: list[int] = []
    ev = Evolver(tiny_store, cfg, progress=False)
    real_status = ev._status

    def status(state, task=None, **fields):
        if "generation" in fields:
            seen.append(fields["generation"])
        return real_status(state, task, **fields)

    monkeypatch.setattr(ev, "_status", status)
    monkeypatch.setattr(training.ChildTraining, "_validate", lambda self: by[seen[-1]])
    before = tiny_store.get_task("digits").iterations_done
    best = ev.active_phase("digits")
    assert seen == [0, 1, 2]
    assert ev.stats["phases_ended_stale"] == 1
    assert best.metrics["validation_accuracy"] == 0.6
    assert tiny_store.get_task("digits").iterations_done == before + 1  # a completed task iteration
    # without the option the phase runs every generation
    seen.clear()
    plain = Evolver(tiny_store, dataclasses.replace(cfg, generation_patience=0), progress=False)
    monkeypatch.setattr(plain, "_status", lambda state, task=None, **f: seen.append(f["generation"])
                        if "generation" in f else None)
    plain.active_phase("parity")
    assert seen == [0, 1, 2, 3, 4] and plain.stats["phases_ended_stale"] == 0


def test_a_long_child_with_sparse_validation_and_data_parallel_trains_its_whole_schedule(tiny_store, monkeypatch):
    """long_validation_ratio: the long child validates once per ceil(ratio x validation
    examples) of training, over the same schedule; long_data_parallel on this process's one
    device trains it there (two devices: tests/test_training.py)."""
    import dataclasses
    import math

    from mu2net.evolver import training as T

    cfg = dataclasses.replace(TINY_EVOLVER, generations=1, children=1, first_answer_epochs=6.0,
                              first_answer_max_samples=10 * 256, checkpoint_publish_seconds=0.0,
                              long_validation_ratio=4.0, long_data_parallel=True)
    t = tiny_store.get_task("small")
    n_train = len(D.read_split(t.dataset_dir, t.splits["train"])[1])
    n_val = len(D.read_split(t.dataset_dir, t.splits["validation"])[1])
    per_cycle = cfg.budget.samples_per_cycle(n_train)
    schedule = min(6.0 * n_train, 10 * 256)
    cycles = max(cfg.first_answer_cycles, math.ceil(schedule / math.ceil(4.0 * n_val)))
    cycle_samples = math.ceil(schedule / cycles)
    assert cycle_samples > per_cycle  # the tiny task: validations sparser than the budget's cycles
    validations = []
    real_validate = T.ChildTraining._validate
    monkeypatch.setattr(T.ChildTraining, "_validate",
                        lambda self: validations.append(self.budget.cycles) or real_validate(self))
    published = []
    real = tiny_store.publish
    monkeypatch.setattr(tiny_store, "publish",
                        lambda path, new, **kw: (path is not None and published.append(path)) or real(path, new, **kw))
    Evolver(tiny_store, cfg, progress=False).active_phase("small")
    assert published, "nothing published"
    assert f"long_schedule:{cycles}x{cycle_samples}" in published[0].metrics["mutations"]
    examples = math.ceil(cycle_samples / cfg.budget.batch_size) * cfg.budget.batch_size  # whole batches
    assert tiny_store.get_task("small").samples_trained == cycles * examples + cfg.budget.cycles * per_cycle
    # one validation per long cycle, then generation 1's child's, one per budget cycle
    assert validations == [cycles] * cycles + [cfg.budget.cycles] * cfg.budget.cycles


DATA_PARALLEL_PHASE = textwrap.dedent("""
    import dataclasses, json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    sys.path.insert(0, {tests!r})
    import jax
    from conftest import TINY_EVOLVER
    from mu2net.store import Store
    from mu2net.evolver import Evolver
    assert len(jax.devices()) == 2
    store = Store({data!r})
    cfg = dataclasses.replace(TINY_EVOLVER, generations=1, children={children}, first_answer_epochs=6.0,
                              first_answer_max_samples=10 * 256, checkpoint_publish_seconds=0.0,
                              long_data_parallel=True)
    import mu2net.evolver.loop as loop
    events = []
    real_train, real_long = loop.train_child, Evolver._train_long
    def train_child(*a, **k):
        out = real_train(*a, **k)
        events.append("short child done")
        return out
    def train_long(self, *a, **k):
        events.append("long child starts")
        return real_long(self, *a, **k)
    loop.train_child, Evolver._train_long = train_child, train_long
    ev = Evolver(store, cfg, progress=False)
    ev.active_phase("small")
    print(json.dumps({{"samples": store.get_task("small").samples_trained, "children": ev.stats["children"],
                      "events": events}}))
""")


@pytest.mark.parametrize("children", [2, 3])
def test_a_data_parallel_long_child_beside_a_reuse_sibling_on_two_devices(tiny_store, children):
    """Two CPU devices, served tasks to reuse: the first-answer generation's frozen reuse
    children and the random root's long child, the latter data-parallel over both devices
    after its siblings (run at once, the long child's all-reduce stalled XLA's CPU thread
    pool until the rendezvous aborted the process). With 3 children a reuse child runs on
    the other device's queue, which the long child waits for."""
    import json
    import math
    import pathlib

    from conftest import digits_splits
    from mu2net.ingest import add_task_arrays

    Evolver(tiny_store, TINY_EVOLVER, progress=False).active_phase("digits")  # a path for "small" to reuse
    if children == 3:
        add_task_arrays(tiny_store, "digits2", digits_splits(), [str(i) for i in range(10)], source="test")
        Evolver(tiny_store, TINY_EVOLVER, progress=False).active_phase("digits2")
    script = DATA_PARALLEL_PHASE.format(tests=str(pathlib.Path(__file__).parent), data=str(tiny_store.data_dir),
                                        children=children)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    t = tiny_store.get_task("small")
    n_train = len(D.read_split(t.dataset_dir, t.splits["train"])[1])
    per_cycle = TINY_EVOLVER.budget.samples_per_cycle(n_train)
    long_cycles = math.ceil(min(6.0 * n_train, 10 * 256) / per_cycle)
    # the long schedule, the reuse children's first-answer cycles, generation 1's children
    reuse = children - 1
    expected = (long_cycles + reuse * TINY_EVOLVER.first_answer_cycles
                + children * TINY_EVOLVER.budget.cycles) * per_cycle
    # the long child after its siblings (then generation 1's children)
    assert out == {"samples": expected, "children": 2 * children,
                   "events": ["short child done"] * reuse + ["long child starts"] + ["short child done"] * children}
    assert tiny_store.best_path("small") is not None


def test_a_preempted_long_first_child_is_parked_and_resumed_on_its_schedule(tiny_store, monkeypatch):
    import dataclasses

    import mu2net.evolver.loop as loop
    from conftest import digits_splits
    from mu2net.ingest import add_task_arrays

    import threading

    for name in ("digits", "parity"):  # only "small" (then "late") is a new task, with only the root to start from
        tiny_store.delete_task(name)
    cfg = dataclasses.replace(TINY_EVOLVER, generations=1, children=1, first_answer_epochs=4.0,
                              first_answer_max_samples=8 * 256, checkpoint_publish_seconds=0.0, preempt=True)
    ev = Evolver(tiny_store, cfg, progress=False)
    ev.preempt_check_seconds = 0.0
    published = []
    first_served = threading.Event()
    real_publish = ev._publish

    def publish(task, best, *a, **k):
        out = real_publish(task, best, *a, **k)
        published.append(out)
        if task.name == "small" and not first_served.is_set():  # the user uploads right after the first answer
            add_task_arrays(tiny_store, "late", digits_splits(), [str(i) for i in range(10)], source="test")
            first_served.set()
        return out

    monkeypatch.setattr(ev, "_publish", publish)
    real_run = loop.ChildTraining.run

    def run(self, cycles, *a, **k):  # tiny cycles take milliseconds: the second waits for the first answer
        if self.cycles_done >= 1:
            assert first_served.wait(timeout=120)
        return real_run(self, cycles, *a, **k)

    monkeypatch.setattr(loop.ChildTraining, "run", run)
    small = tiny_store.get_task("small")
    per_cycle = cfg.budget.samples_per_cycle(len(D.read_split(small.dataset_dir, small.splits["train"])[1]))
    real_train = loop.train_child
    monkeypatch.setattr(loop, "train_child", lambda *a, **k: pytest.fail("a long child is not a train_child call"))
    ev.active_phase("small")
    assert ev.stats["preempted"] == 1 and "small" in ev._suspended
    stopped = ev._suspended["small"]
    done = stopped.child.cycles_done
    assert 1 <= done < stopped.spec.cycles  # stopped a cycle or so after its first checkpoint
    assert tiny_store.get_task("small").iterations_done == 0
    samples = tiny_store.get_task("small").samples_trained
    assert samples == done * per_cycle
    monkeypatch.setattr(loop, "train_child", real_train)
    assert ev.next_task(iterations=1).name == "late"  # the new upload comes first
    ev.active_phase("late")
    # right after the new task's first answer, the parked child goes on: late's phase ends there
    assert "small" in ev._suspended and ev.stats["preempted"] == 2
    assert tiny_store.get_task("late").iterations_done == 0 and tiny_store.best_path("late") is not None
    assert ev.next_task(iterations=1).name == "small"
    # what the parked child holds: its validation history, train step and schedule length,
    # which the resume must continue, not restart
    history0, step0 = list(stopped.child.history), stopped.child.step
    total0 = float(stopped.child.total)
    steps_per_cycle = stopped.child.steps_per_cycle
    assert step0 == done * steps_per_cycle
    ev.active_phase("small")  # resumed: the same schedule goes on from where it stopped
    assert "small" not in ev._suspended
    assert stopped.child.history[:done] == history0 and len(stopped.child.history) == stopped.spec.cycles
    assert stopped.child.step == stopped.spec.cycles * steps_per_cycle  # one schedule: no step restarted
    assert float(stopped.child.total) == total0 == stopped.spec.cycles * steps_per_cycle  # same cosine length
    assert stopped.child.cycles_done == stopped.spec.cycles  # trained to the end of its one schedule
    # every example of the long child counted once (plus generation 1's child of 2 cycles)
    assert tiny_store.get_task("small").samples_trained == (stopped.spec.cycles + cfg.budget.cycles) * per_cycle
    assert tiny_store.get_task("small").iterations_done == 1
    assert tiny_store.verify() == []


def test_an_upload_during_a_phase_preempts_it_within_one_cycle(tiny_store, monkeypatch):
    import dataclasses

    import mu2net.evolver.loop as loop
    from conftest import digits_splits
    from mu2net.ingest import add_task_arrays

    base = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    for name in ("digits", "parity", "small"):
        base.active_phase(name)
    before = tiny_store.get_task("digits").iterations_done
    selections_before = tiny_store.selections("digits")
    ev = Evolver(tiny_store, dataclasses.replace(TINY_EVOLVER, generations=3, preempt=True,
                                                 budget=dataclasses.replace(TINY_EVOLVER.budget, cycles=4)),
                 progress=False)
    ev.preempt_check_seconds = 0.0  # tiny cycles take milliseconds: read the store at every check
    histories = []
    real = loop.train_child

    uploaded = []

    def upload_during_first_child(*a, **k):
        if not uploaded:  # the user uploads while the first child trains
            uploaded.append(True)
            add_task_arrays(tiny_store, "late", digits_splits(), [str(i) for i in range(10)], source="test")
        result = real(*a, **k)
        histories.append(result.history)
        return result

    monkeypatch.setattr(loop, "train_child", upload_during_first_child)
    ev.active_phase("digits")
    # the running child stopped after its first cycle; the second child never started; no
    # later generation ran
    assert histories and len(histories) == 1 and len(histories[0]) == 1, histories
    assert ev.stats["preempted"] == 1
    # the skipped child's parent selection is not counted (Section 3.1's #selections)
    assert sum(tiny_store.selections("digits").values()) == sum(selections_before.values()) + 1
    assert tiny_store.get_task("digits").iterations_done == before  # not counted as a task iteration
    assert ev.next_task(iterations=1).name == "late"  # the new upload comes first
    add_task_arrays(tiny_store, "later", digits_splits(), [str(i) for i in range(10)], source="test")
    assert ev.next_task(iterations=1).name == "late"  # new tasks in upload order


def test_continual_evolution_runs_past_the_configured_iterations_pauses_and_wakes(tiny_store):
    import dataclasses

    ev = Evolver(tiny_store, dataclasses.replace(TINY_EVOLVER, generations=1, patience=1), progress=False)
    assert ev.run(iterations=1) == 3
    assert ev.next_task(iterations=1) is None  # bounded: done
    phases = [0]

    def stop():
        phases[0] += 1
        return phases[0] > 4

    assert ev.run(iterations=1, stop=stop, continual=True) == 4
    tasks = {t.name: t for t in tiny_store.list_tasks()}
    assert sum(t.iterations_done for t in tasks.values()) == 7  # past the configured 1 each
    # pause: digits' next iteration finds nothing better (patience 1) and it pauses at that version
    digits = tasks["digits"]
    tiny_store.set_evolution("digits", stale_iterations=0, paused_version=None)
    quiet = Evolver(tiny_store, dataclasses.replace(ev.config, publish_on_improvement=False), progress=False)
    real_finish = quiet._finish_phase

    def no_better(task, population, published, best_stored, *a, **k):  # keep only the stored path
        return real_finish(task, [best_stored], best_stored, best_stored, *a, **k)

    quiet._finish_phase = no_better
    quiet.active_phase("digits")
    paused = tiny_store.get_task("digits")
    assert paused.stale_iterations == 1 and paused.paused_version == tiny_store.system_version()
    assert paused.improved_at == digits.improved_at
    others = {"parity", "small"}
    for name in others:  # make the other tasks paused too: nothing is awake
        tiny_store.set_evolution(name, stale_iterations=1, paused_version=tiny_store.system_version())
    assert ev.next_task(iterations=1, continual=True) is None
    # wake: the public task small publishes (its path again: a new system version); digits
    # (public) and parity (private, may use public paths) wake; small itself stays paused
    tiny_store.publish(tiny_store.best_path("small"), [], task="small")
    woken = ev.next_task(iterations=1, continual=True)
    assert woken.name in ("digits", "parity") and tiny_store.get_task(woken.name).paused_version is None
    assert tiny_store.get_task("small").paused_version is not None


def test_a_stale_task_gets_longer_children_when_budgets_grow(tiny_store, monkeypatch):
    import dataclasses

    import mu2net.evolver.loop as loop

    ev = Evolver(tiny_store, dataclasses.replace(TINY_EVOLVER, generations=1, grow_when_stale=True), progress=False)
    ev.active_phase("digits")
    cycles = []
    real = loop.train_child

    def spy(arch, params, opts, mask, hp, train, validation, budget, *a, **k):
        cycles.append(budget.cycles)
        return real(arch, params, opts, mask, hp, train, validation, budget, *a, **k)

    monkeypatch.setattr(loop, "train_child", spy)
    tiny_store.set_evolution("digits", stale_iterations=2, paused_version=None)
    ev.active_phase("digits")
    assert cycles == [TINY_EVOLVER.budget.cycles * 4] * TINY_EVOLVER.children  # 2 ** stale_iterations
    cycles.clear()
    tiny_store.set_evolution("digits", stale_iterations=4, paused_version=None)
    ev.active_phase("digits")
    assert cycles == [TINY_EVOLVER.budget.cycles * 8] * TINY_EVOLVER.children  # capped at 8x


def test_lineage_children_continue_the_best_path_with_a_lower_learning_rate(tiny_store, monkeypatch):
    import dataclasses

    import mu2net.evolver.loop as loop
    from mu2net import hparams as H

    cfg = dataclasses.replace(TINY_EVOLVER, generations=2, children=2, lineage_children=1, lineage_lr_steps=3)
    ev = Evolver(tiny_store, cfg, progress=False)
    ev.active_phase("digits")  # never served before: no lineage children
    served = tiny_store.best_path("digits")
    generations = []  # (the population's best path when sampled, the specs trained) per generation
    real_generation, real_train, real_best = ev._train_generation, loop.train_child, loop.best_of
    best_now = []

    def best_spy(population):
        best_now.append(real_best(population))
        return best_now[-1]

    def generation_spy(specs, *a, **k):
        generations.append((best_now[-1], list(specs)))
        return real_generation(specs, *a, **k)

    trained = []

    def train_spy(arch, params, opts, mask, hp, *a, **k):
        trained.append(dict(hp))
        return real_train(arch, params, opts, mask, hp, *a, **k)

    monkeypatch.setattr(loop, "best_of", best_spy)
    monkeypatch.setattr(ev, "_train_generation", generation_spy)
    monkeypatch.setattr(loop, "train_child", train_spy)
    ev.active_phase("digits")
    assert len(generations) == cfg.generations
    assert generations[0][0].id == served.id  # generation 1: the served path is the best
    values = H.SEARCH_SPACE["learning_rate"]
    for best, specs in generations:
        assert len(specs) == cfg.children
        first, other = specs
        assert first.parent.id == best.id and first.parent.task == "digits"  # continues the best path
        # its (mutated) rate 3 values down Table 1's list, recorded among its mutations
        [note] = [m for m in first.mutations if m.startswith("lineage_lr:")]
        old, new = (float(v) for v in note.split(":")[1].split("->"))
        assert new == first.hparams["learning_rate"] and values.index(new) == max(0, values.index(old) - 3)
        # the other child is sampled as Section 3.1 says, its rate untouched (even if its parent is the best)
        assert not any(m.startswith("lineage_lr:") for m in other.mutations)
    # what trains is the lowered rate (children of a generation may train in any order)
    assert sorted(hp["learning_rate"] for hp in trained) == sorted(
        s.hparams["learning_rate"] for _, specs in generations for s in specs)
    assert loop.lower_learning_rate(generations[0][1][0], 100).hparams["learning_rate"] == values[0]  # clipped
    with pytest.raises(ValueError, match="lineage_children"):
        dataclasses.replace(TINY_EVOLVER, lineage_children=TINY_EVOLVER.children + 1)
    with pytest.raises(ValueError, match="lineage_children"):
        dataclasses.replace(TINY_EVOLVER, later_children=1, lineage_children=2)
    # one child per later generation of a served task (the first-answer generation keeps its own)
    generations.clear()
    ev.config = dataclasses.replace(cfg, later_children=1)
    ev.active_phase("digits")
    assert [len(specs) for _, specs in generations] == [1] * cfg.generations
    assert all(specs[0].parent.id == best.id for best, specs in generations)


def test_a_conv_stem_root_with_blocks_is_cloned_whole_by_the_first_answer_and_by_later_children(tmp_path):
    import dataclasses

    from conftest import TINY, digits_splits
    from mu2net import components as C
    from mu2net import root as R
    from mu2net.root import init_root
    from mu2net.ingest import add_task_arrays
    from mu2net.store import Store

    store = Store(tmp_path / "store")
    arch, params = R.random_root(TINY, num_blocks=2, seed=0, stem=C.CONV_STEM)
    init_root(store, arch, params, {"mu": 0.1, "learning_rate": 0.05, "flip": False, "crop": False})
    add_task_arrays(store, "digits", digits_splits(), [str(i) for i in range(10)], source="test")
    ev = Evolver(store, dataclasses.replace(TINY_EVOLVER, clone_random_root=True), progress=False)
    root = store.root_path()
    others = [p for p in store.list_paths() if p.task != "digits"]
    for spec in ev.first_answer_specs(store.get_task("digits"), others):
        # a root with blocks gets no inserted block; every component is trained
        assert spec.architecture.kinds == root.architecture.kinds and all(spec.trainable)
    ev.active_phase("digits")
    best = store.best_path("digits")
    assert best.architecture.kinds[0] == "conv_stem"
    assert not set(best.component_ids) & set(root.component_ids)  # nothing of the random root is shared frozen
    assert best.metrics["validation_accuracy"] > 0.2  # 10 classes: chance is about 0.1
    store.close()


def test_successive_halving_stops_the_worst_children_after_each_rung(tiny_store, monkeypatch):
    import dataclasses

    import jax

    import mu2net.evolver.loop as loop
    from mu2net.evolver import TrainBudget

    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")  # first answer + 2 plain generations
    config = dataclasses.replace(TINY_EVOLVER, generations=1, children=2, halving=2,
                                 budget=TrainBudget(cycles=4, sample_cap=64, batch_size=32))
    ev = Evolver(tiny_store, config, progress=False, devices=jax.devices()[:1])
    made: list = []
    scores_at: dict[int, list] = {}

    class Spy(loop.ChildTraining):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

        def run(self, cycles, on_cycle=None, interrupt=None):
            done = super().run(cycles, on_cycle, interrupt)
            scores_at.setdefault(self.cycles_done, []).append((id(self), self.score))
            return done

    monkeypatch.setattr(loop, "ChildTraining", Spy)
    monkeypatch.setattr(loop, "train_child", lambda *a, **k: (_ for _ in ()).throw(AssertionError("not halved")))
    before = ev.stats["children"]
    ev.active_phase("digits")
    # 2 children * eta 2 = 4 start; rungs at 1, 2 and 4 cycles keep 4, 2, 1 of them
    assert sorted(c.cycles_done for c in made) == [1, 1, 2, 4]
    assert ev.stats["children"] - before == 4  # stopped children are trained children (early pruning decides)
    rung1 = sorted(scores_at[1], key=lambda t: -t[1])
    survivors = {id(c) for c in made if c.cycles_done > 1}
    assert survivors == {i for i, _ in rung1[:2]}  # the best half after the first rung trained on
    assert loop.halving_rungs(24, 2) == [1, 3, 6, 12, 24] and loop.halving_rungs(4, 3) == [1, 4]


def test_identity_insertion_starts_a_child_from_its_parents_function(tiny_store):
    import dataclasses

    from mu2net import components as C
    from mu2net.evolver.mutations import ChildSpec

    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")
    parent = tiny_store.best_path("digits")
    kinds = list(parent.architecture.kinds)
    kinds.insert(len(kinds) - 1, C.TRANSFORMER_BLOCK)
    spec = ChildSpec(parent=parent, task="digits",
                     architecture=dataclasses.replace(parent.architecture, kinds=tuple(kinds)),
                     sources=parent.component_ids[:-1] + (None, parent.component_ids[-1]),
                     trainable=(True,) * len(kinds), hparams=parent.hparams, mutations=("insert_block",))
    t = tiny_store.get_task("digits")
    x, _ = D.read_split(t.dataset_dir, t.splits["test"])
    before = P.predict(parent.architecture, tiny_store.load_params(parent.component_ids), x)
    for identity, same in ((True, True), (False, False)):
        ev = Evolver(tiny_store, dataclasses.replace(TINY_EVOLVER, identity_insertion=identity), progress=False)
        params, _, _ = ev._materialize(spec, t, {}, np.random.default_rng(0))
        after = P.predict(spec.architecture, params, x)
        assert np.allclose(after, before, atol=1e-5) == same


def test_a_crashing_task_backs_off_ends_failed_and_the_others_go_on(tiny_store, monkeypatch):
    import mu2net.evolver.loop as loop
    from mu2net.evolver import schedule as S

    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    real = ev.active_phase
    raised = []

    def phase(name):
        if name == "digits":
            raised.append(name)
            raise RuntimeError("boom")
        return real(name)

    monkeypatch.setattr(ev, "active_phase", phase)
    monkeypatch.setattr(loop, "BACKOFF_SECONDS", 3600.0)  # longer than the other tasks' phases here
    others_done = lambda: all(t.iterations_done >= 1 for t in tiny_store.list_tasks() if t.name != "digits")  # noqa: E731
    ev.run(1, stop=others_done)  # the first failure backs digits off: the other two tasks go on (run would
    # otherwise wait out the back-off, as `mu2net evolve` does)
    digits = tiny_store.get_task("digits")
    assert raised == ["digits"] and digits.state != "failed" and digits.attempts == 1
    assert digits.retry_after is not None and digits.retry_after > __import__("time").time() + 3000
    assert "RuntimeError: boom" in digits.error
    assert [t.iterations_done for t in tiny_store.list_tasks() if t.name != "digits"] == [1, 1]
    assert S.next_task(tiny_store.list_tasks(), tiny_store.served_versions(), 1, False) is None  # backing off
    monkeypatch.setattr(loop, "BACKOFF_SECONDS", 0.0)
    tiny_store.end_attempt("digits", completed=False, retry_after=0.0, error=digits.error)
    ev.run(1)
    digits = tiny_store.get_task("digits")
    assert raised == ["digits"] * 3 and digits.state == "failed"
    assert digits.error.startswith("3 active phases in a row raised; last: RuntimeError: boom")
    # a phase that killed its process (begun, never ended) counts as well
    for _ in range(loop.MAX_PHASE_ATTEMPTS):
        tiny_store.begin_attempt("small")
    tiny_store.set_evolution("small", stale_iterations=0, paused_version=None)
    monkeypatch.setattr(ev, "active_phase", real)
    ev.run(2)
    small = tiny_store.get_task("small")
    assert small.state == "failed" and "3 active phases in a row crashed the evolver" in small.error
    assert tiny_store.get_task("parity").iterations_done == 2  # the others still go on
    tiny_store.begin_attempt("parity")
    tiny_store.cancel_attempt("parity")  # a phase stopped on purpose (SIGTERM) is not counted
    assert tiny_store.get_task("parity").attempts == 0


def test_a_phase_that_loses_a_parent_to_a_deleted_task_is_requeued_not_failed(tiny_store, monkeypatch):
    from conftest import digits_splits
    from mu2net.ingest import add_task_arrays
    from mu2net.store import ComponentsGone

    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")
    digits_path = tiny_store.best_path("digits")
    add_task_arrays(tiny_store, "late", digits_splits(lambda y: (y % 3 == 0).astype(int)), ["no", "yes"],
                    source="test")
    real = ev._train_generation
    calls = []

    def generation(specs, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # late's first-answer generation reuses digits' path: delete digits now
            assert any(s.parent.id == digits_path.id for s in specs)
            assert tiny_store.delete_task("digits") == []
        return real(specs, *args, **kwargs)  # materializes the children: digits' components are gone

    monkeypatch.setattr(ev, "_train_generation", generation)
    head = tiny_store.get_components([digits_path.component_ids[-1]])[0]
    ev.run(1, stop=lambda: ev.stats["requeued"] >= 1)  # stops right after the dropped phase
    late = tiny_store.get_task("late")
    assert ev.stats["requeued"] == 1 and "late" not in tiny_store.served_versions()  # the phase was dropped ...
    assert late.state != "failed" and late.attempts == 0 and late.error is None  # ... uncounted, no back-off
    assert late.retry_after is None
    with pytest.raises(ComponentsGone):  # its array file went with its row
        tiny_store.get_arrays(head.params_digest)
    ev.run(1, stop=lambda: "late" in tiny_store.served_versions())
    assert ev.stats["requeued"] == 1 and "late" in tiny_store.served_versions()  # the requeued phase served it
    assert all("digits" not in c.steps for c in tiny_store.list_components())
    with pytest.raises(ComponentsGone):
        tiny_store.get_components(digits_path.component_ids)
    # an array file read after its component was deleted is ComponentsGone; a missing file of a
    # live component stays a plain StoreError (the store is damaged, not changed)
    live = tiny_store.get_components([tiny_store.best_path("late").component_ids[-1]])[0]
    f = tiny_store.data_dir / "arrays" / live.params_digest[:2] / f"{live.params_digest}.npz"
    assert f.exists()
    f.rename(f.with_suffix(".bak"))
    with pytest.raises(StoreError) as e:
        tiny_store.get_arrays(live.params_digest)
    assert not isinstance(e.value, ComponentsGone)
    f.with_suffix(".bak").rename(f)

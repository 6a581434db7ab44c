"""Store: content addressing, publish transactions, crash safety."""

import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mu2net.store import Store, StoreError, TaskNotFound


def test_arrays_are_content_addressed_and_verified(tmp_path):
    store = Store(tmp_path)
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    d1, d2 = store.put_arrays(tree), store.put_arrays(tree)
    assert d1 == d2
    np.testing.assert_array_equal(store.get_arrays(d1)["a"]["kernel"], tree["a"]["kernel"])
    path = tmp_path / "arrays" / d1[:2] / f"{d1}.npz"
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(StoreError, match="corrupt"):
        store.get_arrays(d1)


def test_unknown_task_error_names_it(tiny_store):
    with pytest.raises(TaskNotFound, match="'nope'"):
        tiny_store.get_task("nope")


CRASH = textwrap.dedent("""
    import os, sys
    from mu2net.store import Store
    from mu2net.evolver import Evolver
    sys.path.insert(0, {tests!r})
    from conftest import TINY_EVOLVER
    Store._commit_publish = lambda self, *a, **k: os._exit(137)  # killed between files and transaction
    store = Store({data!r})
    Evolver(store, TINY_EVOLVER, progress=False).active_phase("small")
""")


def test_publish_interrupted_between_files_and_transaction_keeps_old_state(tiny_store, tmp_path):
    from conftest import TINY_EVOLVER
    from mu2net.evolver import Evolver

    Evolver(tiny_store, TINY_EVOLVER, progress=False).active_phase("digits")
    before_version = tiny_store.system_version()
    before = tiny_store.best_path("digits")
    before_params = tiny_store.load_params(before.component_ids)
    files_before = set((tiny_store.data_dir / "arrays").rglob("*.npz"))
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", CRASH.format(tests=tests_dir, data=str(tiny_store.data_dir))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 137, proc.stderr[-2000:]
    files_after = set((tiny_store.data_dir / "arrays").rglob("*.npz"))
    # a task's first phase always publishes new components (at least its new head): their
    # files were written, then the process died before the transaction
    assert files_after > files_before
    reopened = Store(tiny_store.data_dir)
    assert reopened.system_version() == before_version
    assert reopened.best_path("small") is None and reopened.get_task("small").iterations_done == 0
    after = reopened.best_path("digits")
    assert after.id == before.id and after.metrics == before.metrics
    assert reopened.get_task("digits").iterations_done == 1
    import jax

    for a, b in zip(before_params, reopened.load_params(after.component_ids), strict=True):  # bit for bit
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_store_from_before_the_sample_columns_opens_and_gets_them(tmp_path):
    import sqlite3

    from mu2net.store import Store

    store = Store(tmp_path / "s")
    store.close()
    db = sqlite3.connect(tmp_path / "s" / "mu2net.sqlite")
    for table, col in (("tasks", "samples_trained"), ("history", "samples_trained"), ("history", "lineage_samples")):
        db.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
    db.commit()
    db.close()
    store = Store(tmp_path / "s")
    cols = {r["name"] for r in store._query("PRAGMA table_info(history)")}
    assert {"samples_trained", "lineage_samples"} <= cols
    assert "samples_trained" in {r["name"] for r in store._query("PRAGMA table_info(tasks)")}
    store.close()


def test_remove_orphans_keeps_everything_referenced(tiny_store):
    from mu2net import datasets as D

    store = tiny_store
    data = store.data_dir
    (data / "arrays" / "ff").mkdir(parents=True, exist_ok=True)
    (data / "arrays" / "ff" / ("f" * 64 + ".npz")).write_bytes(b"unreferenced")
    (data / "arrays" / "ff" / ".x.npz.1234.tmp").write_bytes(b"half written")
    (data / "datasets" / "ghost-12345678" / "sub").mkdir(parents=True)
    (data / "uploads-abc").mkdir()
    (data / "uploads-abc" / "x.upload").write_bytes(b"spooled")
    before = store.list_paths()
    assert store.remove_orphans(min_age_seconds=3600) == {"temporary_files": 1, "arrays": 1, "datasets": 0,
                                                         "upload_dirs": 0}  # young directories are kept
    assert store.remove_orphans(min_age_seconds=0) == {"temporary_files": 0, "arrays": 0, "datasets": 1, "upload_dirs": 1}
    assert store.remove_orphans() == {"temporary_files": 0, "arrays": 0, "datasets": 0, "upload_dirs": 0}
    for path in before:  # every retained path still loads, every task's dataset still reads
        store.load_params(path.component_ids)
    for t in store.list_tasks():
        assert len(D.read_split(t.dataset_dir, t.splits["train"])[1]) > 0
    # a store whose recorded dataset paths match none of its folders (moved, restored elsewhere
    # under other names) keeps every dataset folder
    kept = sorted(p.name for p in (data / "datasets").iterdir())
    with store.transaction() as db:
        db.execute("UPDATE tasks SET dataset_dir = '/elsewhere/datasets/other-1/task_dataset/1.0.0'")
    assert store.remove_orphans(min_age_seconds=0)["datasets"] == 0
    assert sorted(p.name for p in (data / "datasets").iterdir()) == kept and len(kept) == 3


def test_a_task_uploaded_again_under_the_same_name_gets_nothing_of_the_old_ones_phase(tiny_store):
    """A phase holds its task's sequence number: once the task is deleted and uploaded again
    under the same name, the old phase's samples and publishes are refused (another task)."""
    from conftest import digits_splits
    from mu2net.ingest import add_task_arrays

    old = tiny_store.get_task("small")
    tiny_store.delete_task("small")
    new = add_task_arrays(tiny_store, "small", digits_splits(lambda y: (y >= 5).astype(int)), ["lt5", "ge5"],
                          source="test")
    assert new.seq > old.seq
    with pytest.raises(TaskNotFound, match=f"no task named 'small' of sequence number {old.seq}"):
        tiny_store.add_samples_trained("small", 100, seq=old.seq)
    tiny_store.add_samples_trained("small", 5, seq=new.seq)
    assert tiny_store.get_task("small").samples_trained == 5
    version = tiny_store.system_version()
    with pytest.raises(StoreError, match="'small' was deleted during its active phase"):
        tiny_store.publish(None, [], task="small", iteration_done=True, task_seq=old.seq)
    assert tiny_store.get_task("small").iterations_done == 0 and tiny_store.system_version() == version
    tiny_store.publish(None, [], task="small", iteration_done=True, task_seq=new.seq)
    assert tiny_store.get_task("small").iterations_done == 1


PUBLISH_LOOP = textwrap.dedent("""
    import dataclasses, sys, uuid
    import numpy as np
    from flax import traverse_util
    from mu2net.store import Store
    store = Store({data!r})
    task = store.get_task("digits")
    while True:  # nothing but file writes, publish transactions and their garbage collection
        best = store.best_path("digits")
        head = store.get_components([best.component_ids[-1]])[0]
        flat = traverse_util.flatten_dict(store.get_arrays(head.params_digest))
        params = traverse_util.unflatten_dict({{k: v + np.float32(1e-3) for k, v in flat.items()}})
        digest, _ = store.write_component_files(params, None)
        record = dataclasses.replace(head, id=digest, params_digest=digest, opt_digest=None, parent_id=head.id)
        path = dataclasses.replace(best, id=uuid.uuid4().hex, component_ids=best.component_ids[:-1] + (digest,),
                                   parent_id=best.id)
        version = store.publish(path, [record], task="digits", task_seq=task.seq)
        print(version, path.id, flush=True)  # acknowledged: committed
""")


def test_kill_9_inside_file_writes_and_publish_transactions_loses_nothing_committed(tiny_store):
    """A process doing nothing but publishes (array files written, the publish transaction,
    its garbage collection) is SIGKILLed at random moments: each time the store verifies,
    its version never goes back behind what was committed, the served path is the last
    committed one or a later one, the start-up sweep leaves nothing to sweep, and another
    task's path still loads bit for bit."""
    import os
    import random
    import signal
    import time

    import jax

    from conftest import TINY_EVOLVER
    from mu2net.evolver import Evolver

    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")
    ev.active_phase("small")
    other = tiny_store.best_path("small")
    other_params = [jax.tree_util.tree_leaves(p) for p in tiny_store.load_params(other.component_ids)]
    data = str(tiny_store.data_dir)
    tiny_store.close()
    rng = random.Random(0)
    committed: list[tuple[int, str]] = []
    swept = 0  # rounds whose kill left a written, uncommitted file (it landed inside a publish)
    for round_ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", PUBLISH_LOOP.format(data=data)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # running its loop
        assert first, proc.stderr.read()[-2000:]
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        # text after the last newline was cut by the kill mid-print: not an acknowledgement
        lines = (first + out).split("\n")[:-1]
        assert all(len(x.split()) == 2 for x in lines), [x for x in lines if len(x.split()) != 2][:3]
        committed += [(int(v), p) for v, p in (line.split() for line in lines)]
        store = Store(data)
        try:
            assert store.verify() == [], round_
            version, last_path = committed[-1]
            assert store.system_version() >= version
            served = store.best_path("digits")
            history = [h["path_id"] for h in store.history("digits")]
            assert last_path in history and history.index(served.id) >= history.index(last_path)
            store.load_params(served.component_ids)  # every file of the served path reads back
            removed = store.remove_orphans(min_age_seconds=0)  # what a serve start does
            swept += bool(removed["arrays"] or removed["temporary_files"])
            assert store.remove_orphans(min_age_seconds=0) == {"temporary_files": 0, "arrays": 0, "datasets": 0,
                                                                "upload_dirs": 0}
            assert store.verify() == []
            assert not list((store.data_dir / "arrays").rglob("*.tmp"))
            for want, got in zip(other_params, store.load_params(store.best_path("small").component_ids)):
                for a, b in zip(want, jax.tree_util.tree_leaves(got), strict=True):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        finally:
            store.close()
    versions = [v for v, _ in committed]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    # some kills landed between a component's files and its publish transaction (most of a
    # loop's time is file writes and fsyncs), so the checks above saw that state too
    assert swept >= 1, "no kill landed inside a publish"


def test_a_transaction_a_signal_handler_interrupted_is_abandoned_so_the_stop_is_recorded(tiny_store):
    """The evolver's SIGTERM handler runs on the thread it interrupted, possibly inside a
    transaction: abandon_transaction rolls that back, so the "stopped" status is written."""
    before = tiny_store.system_version()
    with pytest.raises(sqlite3.OperationalError):  # the interrupted code's COMMIT (never reached in the process)
        with tiny_store.transaction() as db:
            db.execute("UPDATE meta SET value='999' WHERE key='system_version'")
            with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
                tiny_store.set_evolver_status({"state": "stopped"})  # what the handler hit before
            tiny_store.abandon_transaction()
            tiny_store.set_evolver_status({"state": "stopped"})
    assert tiny_store.evolver_status() == {"state": "stopped"}
    assert tiny_store.system_version() == before  # the interrupted transaction's write is gone
    tiny_store.abandon_transaction()  # outside a transaction: nothing to do

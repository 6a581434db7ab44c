"""The evolver's queue: new tasks first, configured iterations, then continual pause/wake."""

from mu2net.evolver.schedule import next_task, woken
from mu2net.store import TaskRecord


def _task(name, seq, *, iterations=0, private=False, improved_at=None, paused=None, state="serving"):
    return TaskRecord(name=name, private=private, acl_group=name if private else None, label_names=("a", "b"),
                      image_shape=(8, 8, 1), num_examples={}, splits={}, dataset_dir="", source="test", state=state,
                      iterations_done=iterations, seq=seq, improved_at=improved_at, paused_version=paused)


def test_order_new_then_fewest_iterations_then_least_recently_improved():
    a = _task("a", 1, iterations=2, improved_at=50.0)
    b = _task("b", 2, iterations=2, improved_at=10.0)
    c = _task("c", 3, iterations=1, improved_at=99.0)
    new = _task("new", 4, state="queued")
    served = {"a": 3, "b": 4, "c": 5}
    assert next_task([a, b, c, new], served, 2, continual=True).name == "new"
    assert next_task([a, b, c], served, 2, continual=True).name == "c"
    assert next_task([a, b], served, 2, continual=False) is None
    assert next_task([a, b], served, 2, continual=True).name == "b"  # improved longest ago
    failed = _task("f", 5, state="failed")
    assert next_task([failed], {}, 2, continual=True) is None


def test_a_paused_task_wakes_only_on_a_related_publish():
    paused = _task("p", 1, iterations=3, paused=7)
    public = _task("pub", 2, iterations=3)
    private = _task("priv", 3, iterations=3, private=True, paused=9)
    assert next_task([paused, private], {"p": 5, "priv": 9}, 2, continual=True) is None
    # a private task's publish does not wake a public task (it may not use private paths)
    assert not woken(paused, [paused, private], {"p": 5, "priv": 12})
    assert not woken(paused, [paused, public], {"p": 5, "pub": 7})  # published before the pause
    assert woken(paused, [paused, public], {"p": 5, "pub": 8})
    assert next_task([paused, public], {"p": 5, "pub": 8}, 2, continual=True).name in ("p", "pub")
    # a private task may use public paths, so a public publish wakes it
    assert woken(private, [private, public], {"priv": 9, "pub": 10})

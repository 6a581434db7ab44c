"""Snapshot loading: shared components loaded once, a task that fails to load is skipped and reported."""

import numpy as np

from conftest import TINY_EVOLVER, digits_splits
from mu2net.evolver import Evolver
from mu2net.server.snapshot import SnapshotManager, bucket_for, bucket_sizes


def test_buckets():
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64] and bucket_sizes(48)[-1] == 48
    assert bucket_for(5, 64) == 8 and bucket_for(64, 64) == 64


def test_swap_loads_only_missing_components_and_a_failed_load_keeps_serving(tiny_store):
    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")
    manager = SnapshotManager(tiny_store, max_batch_size=4)
    assert manager.refresh()
    first = manager.snapshot
    x, _ = digits_splits()["test"]
    probs = first.paths["digits"].predict(x[:4])
    assert probs.shape == (4, 10) and np.allclose(probs.sum(-1), 1, atol=1e-5)

    ev.active_phase("small")
    loaded_before = set(manager._components)
    assert manager.refresh()
    second = manager.snapshot
    assert second.version > first.version and set(second.paths) == {"digits", "small"}
    assert second.paths["digits"] is not first.paths["digits"]  # re-wrapped, same path
    assert second.paths["digits"].path.id == first.paths["digits"].path.id
    assert loaded_before <= set(manager._components)
    np.testing.assert_array_equal(second.paths["digits"].predict(x[:4]), probs)  # old version intact

    # a publish whose array file vanished cannot be loaded: that task is skipped and reported,
    # every other task moves on to the new version
    ev.active_phase("parity")
    new_path = tiny_store.best_path("parity")
    comp = tiny_store.get_components([new_path.component_ids[-1]])[0]
    (tiny_store.data_dir / "arrays" / comp.params_digest[:2] / f"{comp.params_digest}.npz").unlink()
    assert manager.refresh()
    third = manager.snapshot
    assert third.version == tiny_store.system_version() and set(third.paths) == {"digits", "small"}
    assert manager.load_failures == 1 and set(manager.task_errors) == {"parity"}
    assert "task parity" in manager.last_error and "missing" in manager.last_error
    assert not manager.refresh()  # not retried before RETRY_SECONDS
    # a served task whose new path fails keeps serving its old one
    digits_before = third.paths["digits"].path.id
    ev.active_phase("digits")
    assert tiny_store.best_path("digits").id != digits_before  # (seeded) its second phase published
    head = tiny_store.get_components([tiny_store.best_path("digits").component_ids[-1]])[0]
    (tiny_store.data_dir / "arrays" / head.params_digest[:2] / f"{head.params_digest}.npz").unlink()
    assert manager.refresh()
    assert manager.snapshot.paths["digits"].path.id == digits_before and "digits" in manager.task_errors
    np.testing.assert_array_equal(manager.snapshot.paths["digits"].predict(x[:4]), probs)
    # unique_params reads the served snapshot: its components once each
    served = {cid: p for sp in manager.snapshot.paths.values() for cid, p in zip(sp.path.component_ids, sp.params)}
    import jax
    assert manager.unique_params() == sum(x.size for p in served.values() for x in jax.tree_util.tree_leaves(p)) > 0


def test_a_request_held_in_the_batcher_across_a_publish_answers_from_its_own_version(tiny_store):
    """A classify call reads the snapshot once: held inside the batcher while a new version of
    its task is published and swapped in, it answers bit-identically from the path it read;
    the next call answers from the new one."""
    import asyncio
    import threading

    from mu2net.server.service import Service, ServiceConfig

    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")
    service = Service(tiny_store, ServiceConfig(max_batch_size=8))
    x, _ = digits_splits()["test"]
    try:
        assert service.manager.refresh()
        old = service.manager.snapshot.paths["digits"]
        gate, entered = threading.Event(), threading.Event()
        real_predict = type(old).predict

        def held_predict(self, images):
            if self is old and not gate.is_set():
                entered.set()
                assert gate.wait(60)  # the batcher thread holds this batch until the swap is done
            return real_predict(self, images)

        type(old).predict = held_predict
        try:
            async def scenario():
                call = asyncio.ensure_future(service.classify("digits", raw=x[:5], top_k=10))
                assert await asyncio.to_thread(entered.wait, 60)
                first = service.manager.snapshot.version
                for _ in range(4):  # later phases of digits until one publishes a new path
                    await asyncio.to_thread(ev.active_phase, "digits")
                    if tiny_store.best_path("digits").id != old.path.id:
                        break
                assert tiny_store.best_path("digits").id != old.path.id, "no phase published a new path"
                assert await asyncio.to_thread(service.manager.refresh)  # swapped while the call is held
                new = service.manager.snapshot.paths["digits"]
                assert new.version > first and new.path.id != old.path.id
                gate.set()
                held = await call
                after = await service.classify("digits", raw=x[:5], top_k=10)
                return held, after, new

            held, after, new = asyncio.run(scenario())
        finally:
            type(old).predict = real_predict
        assert (held.system_version, held.path_id) == (old.version, old.path.id)
        # bit for bit what the old path computes for the same padded batch (5 images -> bucket 8)
        padded = np.concatenate([x[:5], np.zeros((bucket_for(5, 8) - 5,) + x.shape[1:], x.dtype)])
        np.testing.assert_array_equal(held.probabilities, real_predict(old, padded)[:5])
        assert not np.array_equal(after.probabilities, held.probabilities)  # the new path answers differently
        assert (after.system_version, after.path_id) == (new.version, new.path.id)
    finally:
        service.close()


def test_a_component_shared_by_two_served_paths_is_one_array_in_memory(tiny_store):
    """A second task served on the first one's trunk with a head of its own (as a frozen
    reuse child is): the snapshot holds each shared component once, the same array object in
    both served paths, and loads only the new head for the second."""
    import dataclasses

    import jax

    from mu2net import components as C
    from mu2net.evolver.loop import _digest
    from mu2net.store import ComponentRecord, new_id

    Evolver(tiny_store, TINY_EVOLVER, progress=False).active_phase("digits")
    manager = SnapshotManager(tiny_store, max_batch_size=4)
    assert manager.refresh()
    digits = tiny_store.best_path("digits")
    head = jax.device_get(C.init_component(C.HEAD, digits.architecture.config, jax.random.PRNGKey(7), 2))
    pd, od = tiny_store.write_component_files(head, None)
    record = ComponentRecord(id=_digest(head), kind=C.HEAD, params_digest=pd, opt_digest=od, parent_id=None,
                             task="small", acl_group=None, steps={"small": 1}, num_params=C.num_params(head),
                             num_classes=2)
    path = dataclasses.replace(digits, id=new_id(), task="small", component_ids=digits.component_ids[:-1] + (record.id,),
                               architecture=dataclasses.replace(digits.architecture, num_classes=2),
                               parent_id=digits.id, score=0.5, metrics={})
    tiny_store.publish(path, [record], task="small")
    loaded = set(manager._components)
    assert manager.refresh()
    one, two = manager.snapshot.paths["digits"], manager.snapshot.paths["small"]
    shared = set(one.path.component_ids) & set(two.path.component_ids)
    assert shared == set(digits.component_ids[:-1])
    for cid in shared:
        assert one.params[one.path.component_ids.index(cid)] is two.params[two.path.component_ids.index(cid)]
    assert set(manager._components) - loaded == {record.id}  # only the new head was loaded
    x, _ = digits_splits()["test"]
    assert two.predict(x[:3]).shape == (3, 2)

"""The evolver's children on a 2-node Ray cluster (``ray.cluster_utils.Cluster``, each node
1 CPU; the head node none, so every child runs on one of the two): the same published path,
bit for bit, as the in-process evolver with the same seed; a new task's short first-answer
children on the cluster beside its long child on the driver; and a node killed mid-generation
does not stop the phase."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from conftest import TINY, TINY_EVOLVER, digits_splits
from mu2net import root as R
from mu2net.evolver import Evolver, TrainBudget
from mu2net.ingest import add_task_arrays
from mu2net.root import init_root
from mu2net.store import Store

ray = pytest.importorskip("ray")
# the nodes start after JAX ran in this process (earlier tests, the in-process evolver): Ray
# starts each raylet with subprocess (fork, then exec at once), which JAX's at-fork hook warns about
pytestmark = [pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]
CONFIG = dataclasses.replace(TINY_EVOLVER, generations=2, children=2,
                             budget=TrainBudget(cycles=3, sample_cap=256, batch_size=32))
NODE = {"num_cpus": 1, "object_store_memory": 96 * 1024 ** 2}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 96 * 1024 ** 2})
    nodes = [c.add_node(**NODE), c.add_node(**NODE)]
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def _store(path) -> Store:
    store = Store(path)
    arch, params = R.random_root(TINY, num_blocks=0, seed=0)
    init_root(store, arch, params, {"mu": 0.3, "learning_rate": 0.05, "flip": False, "crop": False})
    add_task_arrays(store, "digits", digits_splits(), [str(i) for i in range(10)], source="test")
    return store


def test_children_on_two_nodes_publish_what_the_in_process_evolver_publishes(cluster, tmp_path):
    from mu2net.evolver.ray_pool import RayChildren

    c, _ = cluster
    pool = RayChildren(c.address)
    assert pool.resources == {"num_cpus": 1.0}  # no GPU or TPU in this cluster
    local, remote = _store(tmp_path / "local"), _store(tmp_path / "remote")
    ev_local, ev_remote = Evolver(local, CONFIG, progress=False), Evolver(remote, CONFIG, progress=False, ray=pool)
    # two phases: the first (its first-answer generation's short children, each published as
    # it comes back, then the later generations) and a second of later generations only
    for phase in range(2):
        ev_local.active_phase("digits")
        ev_remote.active_phase("digits")
        if phase == 0:  # the end of the first-answer generation, whatever order its children completed in
            first = [h["validation_accuracy"] for h in remote.history()]
            assert max(first) == max(h["validation_accuracy"] for h in local.history())
        a, b = local.best_path("digits"), remote.best_path("digits")
        # component ids are digests of their parameters: equal ids, equal bits
        assert a.component_ids == b.component_ids and a.score == b.score
        assert a.metrics["history"] == b.metrics["history"]
    # every child ran on the cluster, on both nodes: the first-answer generation's and both
    # phases' generations 1..G
    assert len(pool.nodes) == CONFIG.children + 2 * CONFIG.generations * CONFIG.children
    assert len(set(pool.nodes)) == 2
    assert ev_remote.stats["children"] == ev_local.stats["children"] == len(pool.nodes)
    pool.close()


def test_a_new_tasks_reuse_child_runs_on_the_cluster_and_its_long_child_on_the_driver(cluster, tmp_path):
    from mu2net.evolver.ray_pool import RayChildren

    c, _ = cluster
    pool = RayChildren(c.address)
    store = _store(tmp_path / "store")
    Evolver(store, dataclasses.replace(CONFIG, generations=1), progress=False).active_phase("digits")
    add_task_arrays(store, "parity", digits_splits(lambda y: y % 2), ["even", "odd"], source="test")
    # the new task's first answer: a frozen reuse of digits' path (short: on the cluster) and a
    # long child of the random root (on this host, published at each better checkpoint)
    cfg = dataclasses.replace(CONFIG, generations=1, first_answer_epochs=4.0, checkpoint_publish_seconds=0.0)
    ev = Evolver(store, cfg, progress=False, ray=pool)
    specs = ev.first_answer_specs(store.get_task("parity"), [store.best_path("digits"), store.root_path()],
                                  num_train=500)
    assert [s.cycles is None for s in specs] == [True, False]
    on_driver = []
    real_long = ev._train_long
    ev._train_long = lambda spec, *a, **k: on_driver.append(spec) or real_long(spec, *a, **k)
    ev.active_phase("parity")
    # the reuse child and generation 1's two children ran on the cluster; the long child here
    assert len(pool.nodes) == 1 + cfg.children
    assert len(on_driver) == 1 and on_driver[0].cycles is not None
    assert ev.stats["children"] == 2 + cfg.children
    assert store.verify() == []
    pool.close()


def test_a_node_killed_mid_generation_costs_that_child_only(cluster, tmp_path):
    from mu2net.evolver.ray_pool import RayChildren, wait_for_nodes

    c, nodes = cluster
    pool = RayChildren(c.address)
    store = _store(tmp_path / "store")
    slow = dataclasses.replace(CONFIG, generations=1, budget=dataclasses.replace(CONFIG.budget, cycles=200))
    ev = Evolver(store, slow, progress=False, ray=pool)
    ev.active_phase("digits")  # the first answer and its later generation, on the cluster
    # the victim: a new node in place of the second one, so its worker is still starting (importing
    # JAX, compiling) when it dies; the first node's worker is warm
    c.remove_node(nodes[1])
    victim = c.add_node(**NODE)
    c.wait_for_nodes()
    wait_for_nodes(3)  # the head, the first node and the victim
    before, seen = store.get_task("digits").iterations_done, len(pool.nodes)
    killed = threading.Event()
    real = pool.train

    def train_then_kill(*a, **k):  # the node dies while the generation's two children run
        def kill() -> None:
            time.sleep(1.5)
            c.remove_node(victim, allow_graceful=False)
            killed.set()
        threading.Thread(target=kill, daemon=True).start()
        return real(*a, **k)

    pool.train = train_then_kill
    started = time.monotonic()
    ev.active_phase("digits")
    assert killed.is_set(), f"the phase ended after {time.monotonic() - started:.1f} s, before the kill"
    assert store.get_task("digits").iterations_done == before + 1  # the phase ended, counted
    # the victim's child ran again on the live node (or, its retries spent, was dropped): no
    # child of this generation finished on the dead node after it died
    done = list(pool.nodes)[seen:]
    assert 1 <= len(done) <= slow.children
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert done[-1] in alive
    pool.close()

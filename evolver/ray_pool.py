"""Evolver children on a Ray cluster (``mu2net serve|evolve --ray-address ADDR``).

The evolver process stays the driver and the only writer of the store: it samples and
materialises a generation's children as it does on its own devices, then trains each one as
a Ray task with the resources a child needs (one GPU, or one TPU, per child where the
cluster has them; else ``cpus_per_child`` CPUs), and turns the returned results into paths
itself. What travels through Ray's object store, each at most once per active phase: the
phase's training and validation splits, and the parameters and momentum of every
component a child starts from (keyed by component id). A child's result (its best
checkpoint's trainable parameters and momentum, score, history) comes back as an object
ref the driver reads when the task ends.

A worker or node that dies mid-child costs that child only: Ray runs the task again up to
``max_retries`` times on a live node (the same seed, so the same result), and a child that
still fails is dropped and logged; the generation and the phase go on with the others.

Which children run on the cluster: every child trained to its budget in one go, that is the
children of Algorithm 1's later generations and the short children of a new task's
first-answer generation (a frozen reuse of a served path with a new head, or a random
root's short clone-all child; each is published as its result comes back, in completion
order, as on the driver). On the driver's own
devices, as without Ray: a random root's long first child (it reports every improving
checkpoint, is parked and resumed across phases, and trains data-parallel over the
driver's devices, which its siblings on the cluster leave free), and successive halving
(``--halving``: its rungs park every child's training state between them, which would have
to move between workers at each rung).

Bit for bit: a child trains with the same seed, parameters, schedule and step function
wherever it runs, so on the same platform the published path is the one the in-process
evolver publishes (``tests/test_ray.py``).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger("mu2net.evolver")


def _train_remote(arch: Any, trainable: tuple[bool, ...], hparams: dict[str, Any],
                  train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray], budget: Any,
                  scorer: tuple[str, int, float], seed: int, scored: float, *components: Any) -> tuple[Any, str, float]:
    """The Ray task: trains one child on the worker's default device; returns its
    :class:`~mu2net.evolver.training.TrainResult`, the id of the node it ran on and the
    seconds its training took there. ``components`` are the parameters of every position,
    then the momentum of every position (None for none): given as object refs at the top
    level, so Ray fetches them before the task starts (and holds its CPUs meanwhile)."""
    import ray

    from mu2net.evolver.scoring import make_scorer
    from mu2net.evolver.training import train_child

    n = len(components) // 2
    params, opts = list(components[:n]), list(components[n:])
    start = time.perf_counter()
    result = train_child(arch, params, opts, trainable, hparams, train, validation, budget,
                         make_scorer(*scorer), seed, None, scored_params=scored)
    return result, ray.get_runtime_context().get_node_id(), time.perf_counter() - start


def nbytes(tree: Any) -> int:
    """Bytes of the arrays in a pytree (0 for None)."""
    import jax

    return sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree_util.tree_leaves(tree))


class RayChildren:
    """Trains children as Ray tasks on the cluster at ``address`` (``"auto"``: the one this
    host belongs to; ``ray.init``'s address).

    Args:
      address: the cluster's address (e.g. ``127.0.0.1:6379``) or ``auto``.
      cpus_per_child: CPUs a child reserves where the cluster has no GPU or TPU.
      max_retries: times Ray runs a child again after its worker or node died.

    Raises:
      ConnectionError: if no cluster answers at ``address`` (Ray's own error, re-raised
        with the address).
    """

    def __init__(self, address: str, *, cpus_per_child: float = 1.0, max_retries: int = 2) -> None:
        import ray

        if cpus_per_child <= 0:
            raise ValueError(f"cpus_per_child must be > 0, got {cpus_per_child}")
        if not ray.is_initialized():
            try:
                ray.init(address=address, namespace="mu2net", log_to_driver=False, logging_level=logging.WARNING)
            except ConnectionError as e:
                raise ConnectionError(f"no Ray cluster at --ray-address {address!r}: {e}") from None
        self.address = address
        total = ray.cluster_resources()
        if total.get("GPU", 0) >= 1:
            self.resources: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1}
        elif total.get("TPU", 0) >= 1:
            self.resources = {"num_cpus": 1, "resources": {"TPU": 1}}
        else:
            self.resources = {"num_cpus": cpus_per_child}
        self._remote = ray.remote(_train_remote).options(max_retries=max_retries, retry_exceptions=False,
                                                         **self.resources)
        self._phase: Any = None  # the key of the phase whose data is in the object store
        self._data: tuple[Any, Any] | None = None
        self._components: dict[tuple[str, str], Any] = {}  # (params|opt, component id) -> object ref
        #: node id each completed child ran on, in completion order, the last 10,000 (the tests read it)
        self.nodes: collections.deque[str] = collections.deque(maxlen=10_000)
        #: bytes put into the object store (``data``: phases' splits; ``params``: components
        #: children start from) and read back (``results``), children completed, and the
        #: seconds from submission to result beyond the training itself (Ray's per-child
        #: overhead: scheduling, transfer, worker start); benchmarks/ray_children.py reads it
        self.counters: dict[str, float] = {"data": 0, "params": 0, "results": 0, "children": 0,
                                           "overhead_seconds": 0.0}

    def _put_phase(self, key: Any, train: tuple[np.ndarray, np.ndarray],
                   validation: tuple[np.ndarray, np.ndarray]) -> tuple[Any, Any]:
        import ray

        if key != self._phase or self._data is None:  # a new phase: its data, and nothing of the last one
            self._phase, self._components = key, {}
            self._data = (ray.put(train), ray.put(validation))
            self.counters["data"] += nbytes(train) + nbytes(validation)
        return self._data

    def _component_ref(self, kind: str, source: str | None, value: Any) -> Any:
        """An object ref of a component's parameters or momentum, put once per phase (a new
        component, ``source`` None, each time); None stays None."""
        import ray

        if value is None:
            return None
        key = (kind, source or "")
        if source is None or key not in self._components:
            self.counters["params"] += nbytes(value)
            ref = ray.put(value)
            if source is None:
                return ref
            self._components[key] = ref
        return self._components[key]

    def train(self, jobs: Sequence[tuple], phase_key: Any, train: tuple[np.ndarray, np.ndarray],
              validation: tuple[np.ndarray, np.ndarray], budget: Any, scorer: tuple[str, int, float],
              interrupt: Callable[[], bool] | None = None, on_done: Callable[[int, Any], None] | None = None,
              poll_seconds: float = 0.5) -> list[Any]:
        """Trains ``jobs`` (the evolver's ``(spec, params, opts, recs, seed, device, scored)``;
        ``device`` is ignored) as Ray tasks; returns each job's ``TrainResult``, or None for a
        child whose worker or node died on each of its tries (logged) or that was cancelled
        because ``interrupt`` said so (a new task is waiting: every child not done yet is
        cancelled, where a child on the driver's devices finishes its cycle and keeps its
        best checkpoint). ``on_done(i, result)`` is called as job i ends either way (``result``
        None for a dropped or cancelled child), in the calling thread. ``phase_key``
        identifies the active phase whose data the object store holds.

        Raises:
          Exception: what a child's training raised, as on the driver (the generation's
            other children are cancelled)."""
        import ray

        data = self._put_phase(phase_key, train, validation)
        refs = []
        submitted = time.perf_counter()
        for spec, params, opts, _recs, seed, _device, scored in jobs:
            p = [self._component_ref("params", src, v) for src, v in zip(spec.sources, params)]
            o = [self._component_ref("opt", src, v) for src, v in zip(spec.sources, opts)]
            refs.append(self._remote.remote(spec.architecture, tuple(spec.trainable), dict(spec.hparams),
                                            data[0], data[1], spec.budget(budget), scorer, seed, scored, *p, *o))
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        try:
            while pending:
                if interrupt is not None and interrupt():
                    cancelled, pending = pending, []
                    for ref in cancelled:
                        ray.cancel(ref)
                    log.info("%d child(ren) on the Ray cluster cancelled (a new task is waiting, or the phase "
                             "stops)", len(cancelled))
                    for ref in cancelled:
                        if on_done is not None:
                            on_done(index[ref], None)
                    break
                ready, pending = ray.wait(pending, num_returns=1, timeout=poll_seconds)
                for ref in ready:
                    i = index[ref]
                    try:
                        results[i], node, seconds = ray.get(ref)
                        self.nodes.append(node)
                        self.counters["children"] += 1
                        self.counters["results"] += nbytes(results[i].params) + nbytes(results[i].opt_state)
                        # (children of one generation wait for free slots too: a sum over children
                        # of wall time beyond their own training, divided by children, is the mean)
                        self.counters["overhead_seconds"] += max(0.0, time.perf_counter() - submitted - seconds)
                    except ray.exceptions.RayTaskError as e:  # raised by the training itself: as on the driver
                        cause = getattr(e, "cause", None)
                        raise (cause if isinstance(cause, Exception) else e) from e
                    except ray.exceptions.RayError as e:  # its retries spent (a worker or node died each time)
                        log.warning("child %d of the generation is dropped: its worker or node died on each of "
                                    "its tries (%s: %s)", i, type(e).__name__,
                                    str(e).splitlines()[0] if str(e) else "")
                    if on_done is not None:
                        on_done(i, results[i])
        finally:  # raising (a child's error, or on_done's): the generation's other children stop
            for ref in pending:
                ray.cancel(ref)
        return results

    def release(self) -> None:
        """Drops the refs of the last phase's data and components, so the cluster's object
        store can free them (the evolver calls it after each active phase)."""
        self._phase, self._data, self._components = None, None, {}

    close = release


def wait_for_nodes(count: int, timeout: float = 60.0) -> None:
    """Waits until the connected cluster has ``count`` live nodes (tests and start-up logs)."""
    import ray

    deadline = time.monotonic() + timeout
    while sum(1 for n in ray.nodes() if n.get("Alive")) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray cluster has fewer than {count} live nodes after {timeout:g} s")
        time.sleep(0.2)

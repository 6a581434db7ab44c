"""Immutable serving snapshots and their background loader (hot-swap, docs/design.md).

The server holds one :class:`Snapshot` reference: ``{task -> served path}`` at one system
version. When the store's system version grows, :class:`SnapshotManager` builds the next
snapshot in a background thread: it loads only the components it lacks (a component
shared by many paths is loaded once, so memory grows with unique parameters, not with
tasks), compiles and warms each new path at every batch bucket, then replaces the
snapshot reference in one assignment. A request reads the reference once, so it finishes
on the version it started with. The store is read in one transaction; a task whose path
fails to load (e.g. a corrupt array) keeps its old served path, if any, and is reported
in :attr:`SnapshotManager.task_errors` while every other task moves on; it is tried again
every :data:`RETRY_SECONDS`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from mu2net import paths as P
from mu2net.store import Store, TaskRecord

log = logging.getLogger("mu2net.server.snapshot")
#: Seconds between attempts to load a task whose path failed to load.
RETRY_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class ServedPath:
    """One task's path, loaded and compiled.

    Attributes:
      task: the task record at load time.
      path: the path record.
      params: device parameters per component (shared with other paths using them).
      version: system version at which this path was published.
    """

    task: TaskRecord
    path: P.Path
    params: tuple[Any, ...]
    version: int

    @functools.cached_property
    def _probabilities(self) -> Callable[[Any, Any], jax.Array]:
        # Looked up once per served path, not per request (the lru_cache lookup hashes the
        # architecture, which is measurable at batch 1).
        return P.probabilities_fn(self.path.architecture)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``[B, classes] float32`` for ``images [B,H,W,C] uint8``."""
        return np.asarray(self._probabilities(self.params, images))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the server serves at one system version."""

    version: int
    paths: Mapping[str, ServedPath]
    loaded_at: float = 0.0


def bucket_sizes(max_batch_size: int) -> list[int]:
    """Padded batch sizes: powers of two up to ``max_batch_size`` (and it)."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


def bucket_for(n: int, max_batch_size: int) -> int:
    return next(b for b in bucket_sizes(max_batch_size) if b >= n)


class SnapshotManager:
    """Loads new system versions from the store and swaps them in atomically.

    Args:
      store: the store (shared with the evolver process).
      max_batch_size: largest padded batch; every bucket is compiled before a swap.
      poll_seconds: how often the store's system version is checked.
      on_swap: called with (old, new) snapshot after every swap (metrics).
      cross_task: also compile, before a swap, the cross-task batching functions of the
        paths that share a trunk (:func:`mu2net.server.grouping.warm`).
    """

    def __init__(self, store: Store, max_batch_size: int = 64, poll_seconds: float = 0.5,
                 on_swap: Callable[[Snapshot, Snapshot, float], None] | None = None,
                 cross_task: bool = True) -> None:
        self.cross_task = cross_task
        self.store = store
        self.max_batch_size = max_batch_size
        self.poll_seconds = poll_seconds
        self.on_swap = on_swap
        self.snapshot = Snapshot(version=-1, paths={})
        self.last_error: str | None = None
        self.task_errors: dict[str, str] = {}
        self.load_failures = 0
        self._last_attempt = 0.0
        self._components: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.snapshot.version >= 0

    def _served_components(self) -> dict[str, Any]:
        # from the immutable snapshot, not the loader's working dict (which a load changes)
        return {cid: p for sp in self.snapshot.paths.values() for cid, p in zip(sp.path.component_ids, sp.params)}

    def unique_params(self) -> int:
        """Scalar parameters of the served snapshot's unique components."""
        return int(sum(x.size for p in self._served_components().values() for x in jax.tree_util.tree_leaves(p)))

    def param_bytes(self) -> int:
        """Bytes of the served snapshot's component parameters on device (each unique component once)."""
        return int(sum(x.nbytes for p in self._served_components().values() for x in jax.tree_util.tree_leaves(p)))

    def refresh(self) -> bool:
        """Builds and swaps in the store's current version if it is newer. Returns True on a swap."""
        with self._refresh_lock:
            version = self.store.system_version()
            retry = bool(self.task_errors) and time.time() - self._last_attempt >= RETRY_SECONDS
            if version == self.snapshot.version and not retry:
                return False
            t0 = time.perf_counter()
            self._last_attempt = time.time()
            try:
                new = self._build()
            except Exception as e:  # keep serving the old version, report the failure
                self.load_failures += 1
                self.last_error = f"loading system version {version} failed: {e!r}"
                log.exception("loading system version %s failed; still serving %s", version, self.snapshot.version)
                return False
            self.load_failures += len(self.task_errors)
            old, self.snapshot = self.snapshot, new  # the hot-swap: one reference assignment
            self.last_error = "; ".join(f"task {t}: {e}" for t, e in sorted(self.task_errors.items())) or None
            live = {cid for sp in new.paths.values() for cid in sp.path.component_ids}
            for cid in [c for c in self._components if c not in live]:
                del self._components[cid]
            if self.on_swap is not None:
                self.on_swap(old, new, time.perf_counter() - t0)
            return True

    def _build(self) -> Snapshot:
        current = self.snapshot
        version, task_list, path_list = self.store.serving_state()  # one consistent read
        tasks = {t.name: t for t in task_list}
        best = {p.task: p for p in path_list if p.task is not None}
        paths: dict[str, ServedPath] = {}
        errors: dict[str, str] = {}
        for name, task in tasks.items():
            path = best.get(name)
            if path is None:
                continue
            old = current.paths.get(name)
            if old is not None and old.path.id == path.id:
                paths[name] = dataclasses.replace(old, task=task)
                continue
            try:
                paths[name] = self._load(task, path, version)
            except Exception as e:  # this task keeps its old path (if any); the others move on
                errors[name] = f"path {path.id} (system version {version}) failed to load: {e!r}"
                log.exception("task %s: loading its path %s failed; %s", name, path.id,
                              "still serving its old path" if old is not None else "not served")
                if old is not None:
                    paths[name] = dataclasses.replace(old, task=task)
        self.task_errors = errors
        if self.cross_task:
            from mu2net.server import grouping

            try:
                grouping.warm(list(paths.values()), bucket_sizes(self.max_batch_size))
            except Exception:  # the batches would compile them then; the swap goes on
                log.exception("compiling the cross-task batching functions of version %s failed", version)
        return Snapshot(version=version, paths=paths, loaded_at=time.time())

    def _load(self, task: TaskRecord, path: P.Path, version: int) -> ServedPath:
        missing = [c for c in path.component_ids if c not in self._components]
        if missing:
            for cid, params in zip(missing, self.store.load_params(missing)):
                self._components[cid] = jax.device_put(params)
        served = ServedPath(task=task, path=path, params=tuple(self._components[c] for c in path.component_ids),
                            version=version)
        h, w, c = task.image_shape
        for b in bucket_sizes(self.max_batch_size):  # compile and warm before the swap
            served.predict(np.zeros((b, h, w, c), np.uint8))
        return served

    def start(self) -> None:
        """Loads the current version, then polls for new ones in a daemon thread."""
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="snapshot-loader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:  # a store read failing must not kill the loader
                log.exception("snapshot refresh failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

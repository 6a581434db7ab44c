"""The store: the single source of truth of a mu2net system (embedded default).

One data directory holds:

* ``mu2net.sqlite`` (WAL mode): tasks, paths, components, provenance, system version;
* ``arrays/<aa>/<sha256>.npz``: content-addressed component parameters and optimizer
  state (flattened pytrees, loaded with ``allow_pickle=False``);
* ``datasets/<task>-<uid>/``: each task's TFDS array_record dataset (see
  :mod:`mu2net.datasets`).

Writes follow big_vision's ``save_checkpoint_ts``: array files first (temporary name, fsync,
rename, fsync of the directory), then one SQLite transaction that points to them. A process
killed between the two leaves unreferenced files and the last committed state. Every
publish bumps the system version by one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path as FsPath
from types import EllipsisType
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from flax import traverse_util

from mu2net import components as C
from mu2net.paths import Architecture, Path

TASK_STATES = ("queued", "training", "serving", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
  name TEXT PRIMARY KEY,
  seq INTEGER NOT NULL,
  private INTEGER NOT NULL,
  acl_group TEXT,
  label_names TEXT NOT NULL,
  image_shape TEXT NOT NULL,
  num_examples TEXT NOT NULL,
  splits TEXT NOT NULL,
  dataset_dir TEXT NOT NULL,
  source TEXT NOT NULL,
  state TEXT NOT NULL,
  iterations_done INTEGER NOT NULL DEFAULT 0,
  error TEXT,
  improved_at REAL,
  stale_iterations INTEGER NOT NULL DEFAULT 0,
  paused_version INTEGER,
  samples_trained INTEGER NOT NULL DEFAULT 0,
  attempts INTEGER NOT NULL DEFAULT 0,
  retry_after REAL,
  pinned INTEGER NOT NULL DEFAULT 0,
  rolled_back_version INTEGER
);
CREATE TABLE IF NOT EXISTS components (
  id TEXT PRIMARY KEY,
  kind TEXT NOT NULL,
  params_digest TEXT NOT NULL,
  opt_digest TEXT,
  parent_id TEXT,
  task TEXT,
  acl_group TEXT,
  steps TEXT NOT NULL,
  num_params INTEGER NOT NULL,
  num_classes INTEGER NOT NULL DEFAULT 0,
  created_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS paths (
  id TEXT PRIMARY KEY,
  task TEXT,
  component_ids TEXT NOT NULL,
  architecture TEXT NOT NULL,
  hparams TEXT NOT NULL,
  score REAL,
  parent_id TEXT,
  metrics TEXT NOT NULL,
  system_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
  system_version INTEGER PRIMARY KEY,
  task TEXT NOT NULL,
  path_id TEXT NOT NULL,
  score REAL,
  validation_accuracy REAL,
  test_accuracy REAL,
  time REAL NOT NULL,
  samples_trained INTEGER,
  lineage_samples INTEGER
);
CREATE TABLE IF NOT EXISTS selections (
  path_id TEXT NOT NULL, task TEXT NOT NULL, count INTEGER NOT NULL,
  PRIMARY KEY (path_id, task)
);
"""

ROOT_PATH_ID = "root"

#: Columns added to ``tasks`` after the first release (added to older stores on open).
_TASK_COLUMNS_ADDED = (("improved_at", "REAL"), ("stale_iterations", "INTEGER NOT NULL DEFAULT 0"),
                       ("paused_version", "INTEGER"), ("samples_trained", "INTEGER NOT NULL DEFAULT 0"),
                       ("attempts", "INTEGER NOT NULL DEFAULT 0"), ("retry_after", "REAL"),
                       ("pinned", "INTEGER NOT NULL DEFAULT 0"), ("rolled_back_version", "INTEGER"))
_HISTORY_COLUMNS_ADDED = (("samples_trained", "INTEGER"), ("lineage_samples", "INTEGER"))


class StoreError(Exception):
    """Base class of store errors."""


class TaskNotFound(StoreError, KeyError):
    """No task of that name exists."""


class ComponentsGone(StoreError):
    """Components are no longer in the layer pool: deleted with a task (``DELETE``, Section
    3.4's removal of a task's knowledge) after a reader, e.g. an active phase, chose a path
    that uses them. The evolver requeues such a phase (it starts again from the store as it
    is now) instead of counting it as a failed attempt."""


#: Lock file of the single evolver a store may have (``filelock``; see :func:`evolver_lock`).
EVOLVER_LOCK = "evolver.lock"


class EvolverRunning(StoreError):
    """Another evolver process holds the store's evolver lock."""


def evolver_lock(data_dir: str | os.PathLike[str]) -> Any:
    """Takes the store's single-writer evolver lock (``DIR/evolver.lock``) without waiting.

    Exactly one evolver (the ``mu2net serve`` evolver process or ``mu2net evolve``) may
    train on a store; the lock is an OS file lock, so it is released when its process dies
    (also by SIGKILL). Keep the returned lock referenced for as long as the evolver runs.

    Raises:
      EvolverRunning: naming the lock file, when another process holds it.
    """
    import filelock

    path = os.path.join(os.fspath(data_dir), EVOLVER_LOCK)
    os.makedirs(os.fspath(data_dir), exist_ok=True)
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise EvolverRunning(f"another evolver process is running on the store {os.fspath(data_dir)!r} (it holds "
                             f"{path}); stop it first: a store has one evolver at a time") from None
    return lock


class TaskPinned(StoreError):
    """A user rolled the task back and pinned it (``mu2net rollback``): the evolver does not
    replace its served path until the user wakes it (:meth:`Store.wake_task`)."""


class ServedPathChanged(StoreError):
    """A rollback's precondition failed inside its transaction: the task's served path is
    no longer the one the rollback chose from, or a rollback without a version found the
    task pinned (another rollback, or a publish, committed in between). Nothing changed."""


class TaskExists(StoreError):
    """A task of that name already exists."""


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """A task row.

    Attributes:
      name: task name (``[A-Za-z0-9_.-]{1,64}``).
      private: whether its components are withheld from tasks outside ``acl_group``.
      acl_group: ACL group of a private task (its own name unless given); None if public.
      label_names: class names, index = label id.
      image_shape: stored example shape ``(height, width, channels)``.
      num_examples: examples per stored split, e.g. ``{"train": 4000, "test": 1000}``.
      splits: TFDS split expressions for ``train``, ``validation`` and ``test``.
      dataset_dir: TFDS dataset directory (absolute).
      source: where the data came from (e.g. ``builtin:digits``).
      state: one of :data:`TASK_STATES`.
      iterations_done: completed task iterations (active phases).
      error: why the task failed, if ``state == "failed"``.
      improved_at: unix time (seconds) of the task's last publish of a new best path.
      stale_iterations: completed task iterations in a row that published nothing better.
      paused_version: system version at which continual evolution paused the task (None
        while it is evolving); see :meth:`Store.set_evolution`.
      samples_trained: training examples every child of the task's phases trained on, kept
        or not (:meth:`Store.add_samples_trained`).
      attempts: active phases of the task begun in a row that did not end (an exception, or
        the evolver process dying inside it); see :meth:`Store.begin_attempt`.
      retry_after: unix time before which the evolver does not start the task again (back
        off after a crashed phase), or None.
      pinned: a user rolled the task back to an earlier path (:meth:`Store.restore_path`):
        the evolver neither runs it nor replaces its served path until the user wakes it
        (:meth:`Store.wake_task`).
      rolled_back_version: system version of the task's last rollback (kept after the user
        wakes it), or None: an evolver phase begun before it publishes nothing
        (:meth:`Store.publish`'s ``since_version``).
    """

    name: str
    private: bool
    acl_group: str | None
    label_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    num_examples: Mapping[str, int]
    splits: Mapping[str, str]
    dataset_dir: str
    source: str
    state: str = "queued"
    iterations_done: int = 0
    error: str | None = None
    seq: int = 0
    improved_at: float | None = None
    stale_iterations: int = 0
    paused_version: int | None = None
    samples_trained: int = 0
    attempts: int = 0
    retry_after: float | None = None
    pinned: bool = False
    rolled_back_version: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


@dataclasses.dataclass(frozen=True)
class ComponentRecord:
    """A component row: an immutable layer of the layer pool with its provenance.

    Attributes:
      id: content address (sha256 of its parameter file).
      kind: one of :data:`mu2net.components.KINDS`.
      params_digest / opt_digest: array files of parameters / optimizer state (momentum).
      parent_id: the component it was cloned from (None if newly initialised).
      task: the task that last trained it (None for root/untrained components).
      acl_group: private ACL group of the data it was trained on (None = public).
      steps: training steps it received on each task, accumulated over its ancestry.
      num_params: scalar parameter count.
      num_classes: output classes (heads only).
    """

    id: str
    kind: str
    params_digest: str
    opt_digest: str | None
    parent_id: str | None
    task: str | None
    acl_group: str | None
    steps: Mapping[str, int]
    num_params: int
    num_classes: int = 0
    created_version: int = 0


def _flatten(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(tree, sep="/") if tree else {}
    return {k: np.asarray(v) for k, v in flat.items()}


def serialize_tree(tree: Mapping[str, Any]) -> bytes:
    """Serialises a nested dict of arrays to ``.npz`` bytes (no pickle)."""
    buf = io.BytesIO()
    flat = _flatten(tree)
    np.savez(buf, **flat)
    return buf.getvalue()


def deserialize_tree(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`serialize_tree`."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        flat = {k: npz[k] for k in npz.files}
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def _fsync_dir(path: FsPath) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsyncs every file and directory under ``root``, the directory holding ``root`` (its
    entry) and that directory's own entry (e.g. ``datasets/`` created by the first upload),
    e.g. a TFDS dataset before the task row that points to it commits."""
    _fsync_dir(FsPath(root).parent)
    _fsync_dir(FsPath(root).parent.parent)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(FsPath(dirpath))


def write_file_atomic(path: FsPath, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary name, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Store:
    """A data directory with SQLite metadata and content-addressed array files.

    Thread-safe within a process (one connection guarded by a lock); several processes
    may open the same directory (SQLite WAL serialises writers).

    Args:
      data_dir: directory to create or open.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = FsPath(data_dir).absolute()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "arrays").mkdir(exist_ok=True)
        (self.data_dir / "datasets").mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.data_dir / "mu2net.sqlite", timeout=60.0,
                                   check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction() as db:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)
            have = {r["name"] for r in db.execute("PRAGMA table_info(tasks)")}
            for col, decl in _TASK_COLUMNS_ADDED:
                if col not in have:
                    db.execute(f"ALTER TABLE tasks ADD COLUMN {col} {decl}")
            have = {r["name"] for r in db.execute("PRAGMA table_info(history)")}
            for col, decl in _HISTORY_COLUMNS_ADDED:
                if col not in have:
                    db.execute(f"ALTER TABLE history ADD COLUMN {col} {decl}")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('system_version', '0')")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('task_seq', '0')")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any exception)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def read_transaction(self) -> Iterator[sqlite3.Connection]:
        """One deferred ``BEGIN`` ... ``COMMIT`` of reads only: every statement inside sees one
        snapshot of the database even while another process commits (WAL)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    def abandon_transaction(self) -> None:
        """Rolls back a transaction that code on this thread left open because a signal
        handler interrupted it (the evolver's SIGTERM handler, which then records its stop
        and exits the process: nothing of that transaction was to be committed). A
        transaction of another thread is waited for, not touched."""
        with self._lock:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- arrays -------------------------------------------------------------------------

    def _array_path(self, digest: str) -> FsPath:
        return self.data_dir / "arrays" / digest[:2] / f"{digest}.npz"

    def put_arrays(self, tree: Mapping[str, Any]) -> str:
        """Writes a pytree of arrays (content-addressed; idempotent) and returns its digest."""
        data = serialize_tree(tree)
        digest = hashlib.sha256(data).hexdigest()
        path = self._array_path(digest)
        if not path.exists():
            write_file_atomic(path, data)
        return digest

    def get_arrays(self, digest: str) -> dict[str, Any]:
        """Reads the pytree written by :meth:`put_arrays`.

        Raises:
          ComponentsGone: if the file is missing because no component uses it any more (its
            component was deleted, e.g. with its task, after the caller read the record).
          StoreError: if the file is missing although a component uses it, or its content does
            not match the digest.
        """
        path = self._array_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            if not self._query("SELECT 1 FROM components WHERE params_digest=? OR opt_digest=? LIMIT 1",
                               (digest, digest)):
                raise ComponentsGone(f"array file {digest} was deleted with its component") from e
            raise StoreError(f"array file {digest} is missing from {self.data_dir}") from e
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"array file {path} is corrupt (content does not match its digest)")
        return deserialize_tree(data)

    # ---- system version -----------------------------------------------------------------

    def system_version(self) -> int:
        """The number of publishes so far."""
        return int(self._query("SELECT value FROM meta WHERE key='system_version'")[0][0])

    # ---- tasks --------------------------------------------------------------------------

    @staticmethod
    def _task(row: sqlite3.Row) -> TaskRecord:
        return TaskRecord(
            name=row["name"], private=bool(row["private"]), acl_group=row["acl_group"],
            label_names=tuple(json.loads(row["label_names"])),
            image_shape=tuple(json.loads(row["image_shape"])),  # type: ignore[arg-type]
            num_examples=json.loads(row["num_examples"]), splits=json.loads(row["splits"]),
            dataset_dir=row["dataset_dir"], source=row["source"], state=row["state"],
            iterations_done=row["iterations_done"], error=row["error"], seq=row["seq"],
            improved_at=row["improved_at"], stale_iterations=row["stale_iterations"],
            paused_version=row["paused_version"], samples_trained=row["samples_trained"],
            attempts=row["attempts"], retry_after=row["retry_after"], pinned=bool(row["pinned"]),
            rolled_back_version=row["rolled_back_version"])

    def add_task(self, task: TaskRecord) -> TaskRecord:
        """Inserts a task at the end of the queue.

        Raises:
          TaskExists: if a task with the same name exists.
          StoreError: if this store is a replica's mirror.
        """
        with self.transaction() as db:
            self._refuse_mirror(db, "adding a task")
            if db.execute("SELECT 1 FROM tasks WHERE name=?", (task.name,)).fetchone():
                raise TaskExists(f"task {task.name!r} already exists")
            seq = int(db.execute("SELECT value FROM meta WHERE key='task_seq'").fetchone()[0]) + 1
            db.execute("UPDATE meta SET value=? WHERE key='task_seq'", (str(seq),))
            db.execute(
                "INSERT INTO tasks (name, seq, private, acl_group, label_names, image_shape, num_examples, splits, "
                "dataset_dir, source, state, iterations_done, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (task.name, seq, int(task.private), task.acl_group, json.dumps(list(task.label_names)),
                 json.dumps(list(task.image_shape)), json.dumps(dict(task.num_examples)),
                 json.dumps(dict(task.splits)), task.dataset_dir, task.source, task.state,
                 task.iterations_done, task.error))
        return dataclasses.replace(task, seq=seq)

    def get_task(self, name: str) -> TaskRecord:
        rows = self._query("SELECT * FROM tasks WHERE name=?", (name,))
        if not rows:
            known = [t.name for t in self.list_tasks()]
            raise TaskNotFound(f"unknown task {name!r}; known tasks: {known}")
        return self._task(rows[0])

    def list_tasks(self) -> list[TaskRecord]:
        """All tasks in queue order (order of addition)."""
        return [self._task(r) for r in self._query("SELECT * FROM tasks ORDER BY seq")]

    def set_task_state(self, name: str, state: str, error: str | None = None) -> None:
        if state not in TASK_STATES:
            raise ValueError(f"task state {state!r} not in {TASK_STATES}")
        with self.transaction() as db:
            cur = db.execute("UPDATE tasks SET state=?, error=? WHERE name=?", (state, error, name))
            if cur.rowcount == 0:
                raise TaskNotFound(f"unknown task {name!r}")

    def begin_attempt(self, name: str) -> int:
        """Records that an active phase of the task begins; returns the attempts in a row so
        far, this one included. Persisted before the phase runs, so a phase that kills its
        process (out of memory, a crash) is counted too; :meth:`end_attempt` ends it.

        Raises:
          TaskNotFound: if there is no such task.
        """
        with self.transaction() as db:
            if db.execute("UPDATE tasks SET attempts = attempts + 1 WHERE name=?", (name,)).rowcount == 0:
                raise TaskNotFound(f"unknown task {name!r}")
            return int(db.execute("SELECT attempts FROM tasks WHERE name=?", (name,)).fetchone()[0])

    def end_attempt(self, name: str, *, completed: bool = True, retry_after: float | None = None,
                    error: str | None = None) -> None:
        """Ends the attempt :meth:`begin_attempt` began.

        Args:
          name: the task.
          completed: the phase ended normally (the attempt count restarts at 0); False for a
            phase that raised, which stays counted, with ``retry_after`` (unix time) and
            ``error`` (kept in the task's ``error`` while it is not failed).

        A phase stopped on purpose (the evolver's SIGTERM) should call
        :meth:`cancel_attempt` instead. Unknown tasks (deleted meanwhile) are ignored.
        """
        with self.transaction() as db:
            if completed:  # a transient error of an earlier attempt no longer applies
                db.execute("UPDATE tasks SET attempts=0, retry_after=NULL, error=CASE WHEN state='failed' THEN "
                           "error ELSE NULL END WHERE name=?", (name,))
            else:
                db.execute("UPDATE tasks SET retry_after=?, error=? WHERE name=?", (retry_after, error, name))

    def cancel_attempt(self, name: str) -> None:
        """Uncounts the running attempt of a phase that was stopped on purpose (SIGTERM)."""
        with self.transaction() as db:
            db.execute("UPDATE tasks SET attempts = MAX(0, attempts - 1) WHERE name=?", (name,))

    def set_evolution(self, name: str, *, stale_iterations: int, paused_version: int | None) -> None:
        """Records a task's continual-evolution state (see :class:`mu2net.evolver.Evolver`).

        Raises:
          TaskNotFound: if there is no such task.
        """
        with self.transaction() as db:
            cur = db.execute("UPDATE tasks SET stale_iterations=?, paused_version=? WHERE name=?",
                             (stale_iterations, paused_version, name))
            if cur.rowcount == 0:
                raise TaskNotFound(f"unknown task {name!r}")

    def count_stale_iteration(self, name: str, patience: int) -> TaskRecord:
        """One more completed task iteration without improvement; at ``patience`` of them in
        a row the task pauses at the current system version. One transaction, so a
        concurrent :meth:`wake_task` is never lost half-way.

        Raises:
          TaskNotFound: if there is no such task.
        """
        with self.transaction() as db:
            version = int(db.execute("SELECT value FROM meta WHERE key='system_version'").fetchone()[0])
            cur = db.execute(
                "UPDATE tasks SET stale_iterations=stale_iterations+1, paused_version=CASE WHEN "
                "paused_version IS NULL AND stale_iterations+1>=? THEN ? ELSE paused_version END WHERE name=?",
                (patience, version, name))
            if cur.rowcount == 0:
                raise TaskNotFound(f"unknown task {name!r}")
        return self.get_task(name)

    def wake_task(self, name: str) -> TaskRecord:
        """Asks the evolver to run the task again (``POST /v1/tasks/{name}/evolve``): clears
        its pause, its pin (:meth:`restore_path`) and its count of iterations without
        improvement.

        Raises:
          TaskNotFound: if there is no such task.
        """
        with self.transaction() as db:
            cur = db.execute("UPDATE tasks SET stale_iterations=0, paused_version=NULL, pinned=0 WHERE name=?",
                             (name,))
            if cur.rowcount == 0:
                raise TaskNotFound(f"unknown task {name!r}")
        return self.get_task(name)

    def add_samples_trained(self, name: str, samples: int, seq: int | None = None) -> None:
        """Adds ``samples`` (training examples, >= 0) to the task's :attr:`TaskRecord.samples_trained`.

        ``seq``: the task's :attr:`TaskRecord.seq` when its phase began; a task deleted and
        uploaded again under the same name since then is another task and is not credited.

        Raises:
          ValueError: for a negative count.
          TaskNotFound: if there is no such task (of that ``seq``).
        """
        if samples < 0:
            raise ValueError(f"samples must be >= 0, got {samples}")
        with self.transaction() as db:
            if db.execute("UPDATE tasks SET samples_trained = samples_trained + ? WHERE name=? AND (? IS NULL OR seq=?)",
                          (int(samples), name, seq, seq)).rowcount == 0:
                raise TaskNotFound(f"no task named {name!r}" + ("" if seq is None else f" of sequence number {seq}"))

    def history(self, task: str | None = None) -> list[dict[str, Any]]:
        """Every publish of a new best path, oldest first: ``system_version``, ``task``,
        ``path_id``, ``score``, ``validation_accuracy`` and ``test_accuracy`` (in [0, 1]),
        ``time`` (unix seconds), ``samples_trained`` (the task's training examples so far,
        every child counted; None in stores older than the column) and ``lineage_samples``
        (the training examples on the task behind the published parameters: the path's
        head's train steps on it times the batch size). ``task`` restricts it to one task."""
        sql, args = "SELECT * FROM history", ()
        if task is not None:
            sql, args = sql + " WHERE task=?", (task,)
        return [dict(r) for r in self._query(sql + " ORDER BY system_version", args)]

    def set_evolver_status(self, status: Mapping[str, Any]) -> None:
        """What the evolver is doing now (a JSON object; written by the evolver process)."""
        with self.transaction() as db:
            db.execute("INSERT INTO meta VALUES ('evolver_status', ?) ON CONFLICT(key) DO UPDATE SET "
                       "value=excluded.value", (json.dumps(dict(status)),))

    def evolver_status(self) -> dict[str, Any]:
        """The last :meth:`set_evolver_status` (empty before the evolver's first write)."""
        rows = self._query("SELECT value FROM meta WHERE key='evolver_status'")
        return json.loads(rows[0][0]) if rows else {}

    # ---- components and paths -----------------------------------------------------------

    @staticmethod
    def _component(row: sqlite3.Row) -> ComponentRecord:
        return ComponentRecord(
            id=row["id"], kind=row["kind"], params_digest=row["params_digest"],
            opt_digest=row["opt_digest"], parent_id=row["parent_id"], task=row["task"],
            acl_group=row["acl_group"], steps=json.loads(row["steps"]),
            num_params=row["num_params"], num_classes=row["num_classes"],
            created_version=row["created_version"])

    def get_components(self, ids: Iterable[str]) -> list[ComponentRecord]:
        """Component records in the order of ``ids``.

        Raises:
          ComponentsGone: if an id is not in the layer pool.
        """
        ids = list(ids)
        rows = {r["id"]: r for r in self._query(
            f"SELECT * FROM components WHERE id IN ({','.join('?' * len(ids))})", ids)}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise ComponentsGone(f"components {missing} are not in the layer pool")
        return [self._component(rows[i]) for i in ids]

    def list_components(self) -> list[ComponentRecord]:
        return [self._component(r) for r in self._query("SELECT * FROM components")]

    def load_params(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Parameter pytrees (numpy) of components ``ids``, in order."""
        return [self.get_arrays(c.params_digest) for c in self.get_components(ids)]

    def load_opt_state(self, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Optimizer states (momentum pytrees) of components ``ids``; None if never trained."""
        return [self.get_arrays(c.opt_digest) if c.opt_digest else None
                for c in self.get_components(ids)]

    @staticmethod
    def _path(row: sqlite3.Row) -> Path:
        a = json.loads(row["architecture"])
        arch = Architecture(C.ViTConfig(**a["config"]), tuple(a["kinds"]), a["num_classes"])
        return Path(id=row["id"], task=row["task"], component_ids=tuple(json.loads(row["component_ids"])),
                    architecture=arch, hparams=json.loads(row["hparams"]), score=row["score"],
                    parent_id=row["parent_id"], metrics=json.loads(row["metrics"]))

    def list_paths(self) -> list[Path]:
        """Every retained path: the root model and each task's best path."""
        return [self._path(r) for r in self._query("SELECT * FROM paths ORDER BY system_version, id")]

    def serving_state(self) -> tuple[int, list[TaskRecord], list[Path]]:
        """The system version, every task (queue order) and every retained path, read in one
        read transaction: a consistent view even while the evolver publishes (WAL)."""
        with self.read_transaction() as db:
            version = int(db.execute("SELECT value FROM meta WHERE key='system_version'").fetchone()[0])
            tasks = [self._task(r) for r in db.execute("SELECT * FROM tasks ORDER BY seq").fetchall()]
            paths = [self._path(r) for r in db.execute("SELECT * FROM paths ORDER BY system_version, id").fetchall()]
        return version, tasks, paths

    def export_state(self) -> dict[str, Any]:
        """What serving needs at the current system version, as JSON-able rows read in one
        read transaction (the model repository's manifest, :mod:`mu2net.repository`).

        Returns:
          ``{"store_id": str, "system_version": int, "tasks": [...], "paths": [...],
          "components": [...], "history": [...], "evolver_status": {...}}``: the rows of those
          tables as column -> value dicts. Components carry no optimizer state (``opt_digest`` is None): a
          replica serves, it does not train.
        """
        with self.read_transaction() as db:
            version = int(db.execute("SELECT value FROM meta WHERE key='system_version'").fetchone()[0])
            rows = {t: [dict(r) for r in db.execute(f"SELECT * FROM {t} ORDER BY {order}").fetchall()]
                    for t, order in (("tasks", "seq"), ("paths", "system_version, id"), ("components", "id"),
                                     ("history", "system_version"))}
            status = db.execute("SELECT value FROM meta WHERE key='evolver_status'").fetchone()
            store_id = db.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()[0]
        for c in rows["components"]:
            c["opt_digest"] = None
        return {"store_id": store_id, "system_version": version, **rows,
                "evolver_status": json.loads(status[0]) if status else {}}

    def change_mark(self) -> tuple[int, int]:
        """A cheap mark that differs after any commit to the database since it was read:
        SQLite's ``PRAGMA data_version`` (commits by other connections, e.g. the evolver
        process) and this connection's ``total_changes`` (its own). Equal marks: nothing
        :meth:`export_state` reads has changed."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0]), int(self._db.total_changes)

    def store_id(self) -> str:
        """This store's identity (random, made with the store): a model repository belongs to one."""
        return str(self._query("SELECT value FROM meta WHERE key='store_id'")[0][0])

    def mirrored_manifest(self) -> dict[str, Any] | None:
        """A mirror's last imported manifest (``store_id``, ``system_version``,
        ``revision``), None before the first import."""
        rows = self._query("SELECT value FROM meta WHERE key='mirror_manifest'")
        return json.loads(rows[0][0]) if rows else None

    def _refuse_mirror(self, db: sqlite3.Connection, what: str) -> None:
        row = db.execute("SELECT value FROM meta WHERE key='mirror_of'").fetchone()
        if row is not None:
            raise StoreError(f"store {self.data_dir} is a replica's mirror of {row[0]!r}: {what} happens on the "
                             f"evolver host's store (a mirror's content is replaced at its next sync)")

    def mirror_of(self) -> str | None:
        """The model repository URL this store mirrors (a replica's), None for a store of its own."""
        rows = self._query("SELECT value FROM meta WHERE key='mirror_of'")
        return rows[0][0] if rows else None

    def make_mirror(self, url: str) -> None:
        """Marks this store as a replica's mirror of the repository at ``url``
        (:meth:`import_state` replaces everything in it).

        Raises:
          StoreError: if the store holds tasks or paths of its own (it is no mirror, and a
            replica would overwrite them), or mirrors another repository.
        """
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key='mirror_of'").fetchone()
            if row is not None:
                if row[0] != url:
                    raise StoreError(f"store {self.data_dir} mirrors the repository {row[0]!r}, not {url!r}; give a "
                                     f"replica a data directory of its own for each repository")
                return
            own = db.execute("SELECT (SELECT COUNT(*) FROM tasks) + (SELECT COUNT(*) FROM paths)").fetchone()[0]
            if own:
                raise StoreError(f"store {self.data_dir} holds tasks or paths of its own; a replica mirrors a model "
                                 f"repository into an empty data directory (its content would be replaced)")
            db.execute("INSERT INTO meta VALUES ('mirror_of', ?)", (url,))

    def import_state(self, state: Mapping[str, Any]) -> int:
        """Makes this store a mirror of ``state`` (:meth:`export_state` of another store, as a
        replica reads it from the model repository): its tasks, paths, components, history,
        evolver status and system version are replaced in one transaction, then the array
        files are removed that neither this import uses nor the last import before it with
        other arrays (a new revision with the same arrays keeps that grace; only this one's
        when a task was deleted). A mirror is never
        trained on; only a store marked by :meth:`make_mirror` can be imported into.

        Returns:
          The number of array files removed.

        Raises:
          StoreError: if the store is not a mirror, a row names a column the table does not
            have, or a component's parameter file has not been written to this store first
            (:meth:`put_array_bytes`).
        """
        version = int(state["system_version"])
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM meta WHERE key='mirror_of'").fetchone() is None:
                raise StoreError(f"store {self.data_dir} is not a mirror (Store.make_mirror); importing would replace "
                                 f"its own tasks and paths")
            for table in ("tasks", "paths", "components", "history"):
                columns = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                for row in state[table]:
                    unknown = sorted(set(row) - columns)
                    if unknown:
                        raise StoreError(f"{table} row has unknown columns {unknown}; allowed: {sorted(columns)}")
            for c in state["components"]:
                if not is_digest(c["params_digest"]):
                    raise StoreError(f"component {c['id']}: {c['params_digest']!r} is not a sha256 hex digest")
                if not self._array_path(c["params_digest"]).exists():
                    raise StoreError(f"component {c['id']}: array file {c['params_digest']} was not written first")
            before = {(r[0], r[1]) for r in db.execute("SELECT name, seq FROM tasks")}
            deleted = bool(before - {(t.get("name"), t.get("seq")) for t in state["tasks"]})
            for table in ("selections", "paths", "components", "history", "tasks"):
                db.execute(f"DELETE FROM {table}")
            for table in ("tasks", "components", "paths", "history"):
                for row in state[table]:
                    names = list(row)
                    db.execute(f"INSERT INTO {table} ({','.join(names)}) VALUES ({','.join('?' * len(names))})",
                               [row[n] for n in names])
            db.execute("UPDATE meta SET value=? WHERE key='system_version'", (str(version),))
            current = sorted({c["params_digest"] for c in state["components"]})

            def meta_list(key: str) -> list[str]:
                row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
                return list(json.loads(row[0])) if row else []

            # the arrays of the previous import with other arrays stay until the next import with
            # other arrays (new revisions of one version, e.g. sample counts, do not end it): the
            # snapshot loader may be reading them for the version it is swapping from; not after
            # a task's deletion, whose removal of the task's knowledge takes effect at once
            # (Section 3.4)
            previous = meta_list("mirror_digests")
            grace = [] if deleted else (previous if set(previous) != set(current) else meta_list("mirror_grace"))
            for key, value in (("evolver_status", dict(state.get("evolver_status") or {})), ("mirror_digests", current),
                               ("mirror_grace", grace),
                               ("mirror_manifest", {"store_id": state.get("store_id"), "system_version": version,
                                                    "revision": int(state.get("revision", 0))})):
                db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                           (key, json.dumps(value)))
            live = set(current) | set(grace)
        removed = 0
        for f in (self.data_dir / "arrays").rglob("*.npz"):
            if f.stem not in live:
                f.unlink(missing_ok=True)
                removed += 1
        return removed

    def array_file(self, digest: str) -> FsPath:
        """The file holding the arrays of ``digest`` (it may not exist)."""
        return self._array_path(digest)

    def put_array_bytes(self, digest: str, data: bytes) -> None:
        """Writes an array file received from elsewhere (a replica's copy from the model
        repository) under its digest.

        Raises:
          StoreError: if ``data`` does not hash to ``digest``.
        """
        if not is_digest(digest):
            raise StoreError(f"array digest {digest!r} is not a sha256 hex digest")
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"array {digest}: content does not match its digest")
        path = self._array_path(digest)
        if not path.exists():
            write_file_atomic(path, data)

    def fetch_missing_arrays(self, digests: Iterable[str], read_array: Callable[[str], bytes]) -> int:
        """Writes each array of ``digests`` this store lacks with ``read_array(digest)`` (a
        model repository's copy; checked against its digest, :meth:`put_array_bytes`).
        Returns how many were fetched.

        Raises:
          StoreError: if a digest is malformed or the bytes read do not hash to it.
        """
        fetched = 0
        for digest in dict.fromkeys(digests):  # each once, in order
            if not is_digest(digest):
                raise StoreError(f"array digest {digest!r} is not a sha256 hex digest")
            if not self._array_path(digest).exists():
                self.put_array_bytes(digest, read_array(digest))
                fetched += 1
        return fetched

    def restore_path(self, path_row: Mapping[str, Any], component_rows: Sequence[Mapping[str, Any]],
                     read_array: Callable[[str], bytes], task_seq: int | None = None, *,
                     expect_served: str | None | EllipsisType = ..., refuse_pinned: bool = False) -> int:
        """Rolls a task back to an earlier path and pins it there (``mu2net rollback``).

        ``path_row`` and ``component_rows`` are the path's rows as :meth:`export_state` wrote
        them into a model repository's manifest; the parameter files of components no longer
        in the layer pool are fetched with ``read_array(digest)`` (checked against their
        digests) and the components come back without momentum. The path is published as a
        new system version (an ordinary publish row in its history), and the task is pinned: the
        evolver neither runs it nor replaces its path until :meth:`wake_task`. ``task_seq``:
        the task's :attr:`TaskRecord.seq` the path belonged to (a task deleted and uploaded
        again under its name since is another task, and nothing is restored to it).
        ``expect_served``: the id of the path the caller saw served (None: no path), checked
        in the publish's transaction (``...``: no check); ``refuse_pinned``: refuse a task
        pinned meanwhile (a rollback without a version must not go a second step back when
        two run at once).

        Returns:
          The system version of the publish.

        Raises:
          ComponentsGone: if a component was trained on a task deleted since (Section 3.4's
            removal is never undone).
          ServedPathChanged: the served path is not ``expect_served`` any more, or
            ``refuse_pinned`` and the task is pinned; nothing changed.
          StoreError: if the rows do not describe the path's components, an array does not
            match its digest, or the task is another one than ``task_seq``'s.
        """
        by_id = {c["id"]: c for c in component_rows}
        path = self._path(path_row)  # type: ignore[arg-type]
        missing = [cid for cid in path.component_ids if cid not in by_id]
        if missing:
            raise StoreError(f"path {path.id}: no rows for its components {missing}")
        # every component of the path, the ones still in the layer pool too: a publish may drop
        # one before this commit (its row then comes back; INSERT OR IGNORE keeps a live row)
        records = []
        for cid in path.component_ids:
            row = by_id[cid]
            if not is_digest(row["params_digest"]):
                raise StoreError(f"component {cid}: {row['params_digest']!r} is not a sha256 hex digest")
        self.fetch_missing_arrays((by_id[cid]["params_digest"] for cid in path.component_ids), read_array)
        for cid in path.component_ids:
            row = by_id[cid]
            records.append(ComponentRecord(
                id=cid, kind=row["kind"], params_digest=row["params_digest"], opt_digest=None,
                parent_id=row["parent_id"], task=row["task"], acl_group=row["acl_group"],
                steps=json.loads(row["steps"]), num_params=row["num_params"], num_classes=row["num_classes"]))
        check: dict[str, Any] = dict(check_served=expect_served is not ..., refuse_pinned=refuse_pinned,
                                     expect_served=None if expect_served is ... else expect_served)
        try:
            return self._commit_publish(path, records, path.task, False, {}, task_seq, pin=True, **check)
        except (ComponentsGone, ServedPathChanged):
            raise
        except StoreError:
            # a publish of the evolver dropped a component still live at the check above, and its
            # file with it: fetch what is missing again and commit once more
            if not self.fetch_missing_arrays((r.params_digest for r in records), read_array):
                raise
        return self._commit_publish(path, records, path.task, False, {}, task_seq, pin=True, **check)

    def served_versions(self) -> dict[str, int]:
        """Task name -> system version of its retained (served) path's publish."""
        return {r["task"]: r["system_version"]
                for r in self._query("SELECT task, system_version FROM paths WHERE task IS NOT NULL")}

    def get_path(self, path_id: str) -> Path:
        rows = self._query("SELECT * FROM paths WHERE id=?", (path_id,))
        if not rows:
            raise StoreError(f"unknown path {path_id!r}")
        return self._path(rows[0])

    def best_path(self, task: str) -> Path | None:
        """The task's retained (served) path, or None before its first publish."""
        rows = self._query("SELECT * FROM paths WHERE task=?", (task,))
        return self._path(rows[0]) if rows else None

    def root_path(self) -> Path | None:
        rows = self._query("SELECT * FROM paths WHERE id=?", (ROOT_PATH_ID,))
        return self._path(rows[0]) if rows else None

    def selections(self, task: str) -> dict[str, int]:
        """#selections(m, t) of Section 3.1 for the active task ``task``: path id -> count."""
        return {r["path_id"]: r["count"]
                for r in self._query("SELECT * FROM selections WHERE task=?", (task,))}

    def write_component_files(self, params: Mapping[str, Any],
                              opt_state: Mapping[str, Any] | None) -> tuple[str, str | None]:
        """First half of a publish: writes a component's array files, returns their digests."""
        pd = self.put_arrays(params)
        od = self.put_arrays(opt_state) if opt_state is not None else None
        return pd, od

    def publish(self, path: Path | None, new_components: Sequence[ComponentRecord], *,
                task: str | None = None, iteration_done: bool = False,
                selections: Mapping[str, int] | None = None, task_seq: int | None = None,
                since_version: int | None = None) -> int:
        """Second half of a publish: one transaction.

        Inserts ``new_components`` (whose files must already be written), makes ``path``
        the best path of ``path.task`` (replacing the previous one; recorded in
        :meth:`history`; a higher score than the previous one also sets ``improved_at``
        and clears the task's stale count and pause), records the task's
        ``selections`` counts and, if ``iteration_done``, counts one more task iteration.
        Bumps the system version when ``path`` is given. ``task_seq``: the task's
        :attr:`TaskRecord.seq` when its phase began; a task deleted and uploaded again under
        the same name since then is another task, and nothing is published to it.
        ``since_version``: the system version when the caller's phase began; if a user rolled
        the task back after it, nothing is published (even once the user woke the task: the
        phase continues the lineage the user left).

        Returns:
          The system version after the transaction.

        Raises:
          ComponentsGone: if ``path`` uses components no longer in the layer pool, or a new
            component was trained on a task that no longer exists (deleted with another task
            during the phase: Section 3.4's removal must not be undone).
          TaskPinned: if a user rolled the task back and pinned it (:meth:`restore_path`)
            since, or rolled it back after ``since_version``; nothing is published or
            recorded (the phase's bookkeeping neither).
          StoreError: if a referenced array file is missing, or the task was deleted (or
            replaced by another of the same name).
        """
        return self._commit_publish(path, new_components, task or (path.task if path else None),
                                    iteration_done, selections or {}, task_seq, since_version=since_version)

    def _commit_publish(self, path: Path | None, new_components: Sequence[ComponentRecord],
                        task: str | None, iteration_done: bool,
                        selections: Mapping[str, int], task_seq: int | None = None, pin: bool = False,
                        since_version: int | None = None, *, check_served: bool = False,
                        expect_served: str | None = None, refuse_pinned: bool = False) -> int:
        """The publish transaction. ``check_served``: refuse (:class:`ServedPathChanged`)
        unless the task's served path id is ``expect_served`` (None: none served);
        ``refuse_pinned``: refuse a pinned task the same way (a rollback's checks, inside the
        transaction that commits it)."""
        with self.transaction() as db:
            # checked inside the write transaction: a delete unlinks a file only inside one of its
            # own after checking no row references it (_delete_component_files)
            for c in new_components:
                for d in (c.params_digest, c.opt_digest):
                    if d and not self._array_path(d).exists():
                        raise StoreError(f"component {c.id}: array file {d} was not written first")
            self._refuse_mirror(db, "publishing")
            version = int(db.execute("SELECT value FROM meta WHERE key='system_version'").fetchone()[0])
            row = db.execute("SELECT seq, pinned, rolled_back_version FROM tasks WHERE name=?", (task,)).fetchone() \
                if task is not None else None
            if task is not None and (row is None or (task_seq is not None and row[0] != task_seq)):
                raise StoreError(f"task {task!r} was deleted during its active phase; nothing published")
            if task is not None and not pin and row[1]:
                raise TaskPinned(f"task {task!r} was rolled back and pinned by a user; its served path stays "
                                 f"until the user wakes it")
            if task is not None and not pin and since_version is not None and row[2] is not None \
                    and row[2] > since_version:
                raise TaskPinned(f"task {task!r} was rolled back by a user at system version {row[2]}, after this "
                                 f"phase began (at {since_version}); its phase publishes nothing")
            if task is not None and refuse_pinned and row[1]:
                raise ServedPathChanged(f"task {task!r} was rolled back and pinned meanwhile (another rollback); "
                                        f"nothing restored")
            if task is not None and check_served:
                now = db.execute("SELECT id FROM paths WHERE task=?", (task,)).fetchone()
                if (now[0] if now else None) != expect_served:
                    raise ServedPathChanged(f"task {task!r}'s served path changed during the rollback (from "
                                            f"{expect_served} to {now[0] if now else None}: another rollback or "
                                            f"a publish); nothing restored")
            if path is not None:
                # a component trained (also cloned from) on a task deleted meanwhile carries that
                # task's knowledge: it must not come back into the layer pool (Section 3.4)
                live = {r[0] for r in db.execute("SELECT name FROM tasks")}
                for c in new_components:
                    gone = sorted(set(c.steps) - live)
                    if gone:
                        raise ComponentsGone(f"component {c.id} was trained on the deleted task(s) {gone}")
                version += 1
                db.execute("UPDATE meta SET value=? WHERE key='system_version'", (str(version),))
                for c in new_components:
                    db.execute(
                        "INSERT OR IGNORE INTO components VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (c.id, c.kind, c.params_digest, c.opt_digest, c.parent_id, c.task,
                         c.acl_group, json.dumps(dict(c.steps)), c.num_params, c.num_classes, version))
                missing = [cid for cid in path.component_ids if not db.execute(
                    "SELECT 1 FROM components WHERE id=?", (cid,)).fetchone()]
                if missing:
                    raise ComponentsGone(f"path {path.id} uses components {missing} not in the layer pool")
                if path.task is not None:
                    prev = db.execute("SELECT score FROM paths WHERE task=?", (path.task,)).fetchone()
                    db.execute("DELETE FROM paths WHERE task=?", (path.task,))
                    m = path.metrics
                    trained = db.execute("SELECT samples_trained FROM tasks WHERE name=?", (path.task,)).fetchone()
                    db.execute("INSERT INTO history (system_version, task, path_id, score, validation_accuracy, "
                               "test_accuracy, time, samples_trained, lineage_samples) VALUES (?,?,?,?,?,?,?,?,?)", (
                                   version, path.task, path.id, path.score, m.get("validation_accuracy"),
                                   m.get("test_accuracy"), time.time(), trained[0] if trained else None,
                                   m.get("lineage_samples")))
                    if prev is None or prev[0] is None or (path.score is not None and path.score > prev[0]):
                        # a higher score (not a tie): the task improved, and is awake
                        db.execute("UPDATE tasks SET improved_at=?, stale_iterations=0, paused_version=NULL "
                                   "WHERE name=?", (time.time(), path.task))
                arch = path.architecture
                db.execute("INSERT INTO paths VALUES (?,?,?,?,?,?,?,?,?)", (
                    path.id, path.task, json.dumps(list(path.component_ids)),
                    json.dumps({"config": arch.config.to_dict(), "kinds": list(arch.kinds),
                                "num_classes": arch.num_classes}),
                    json.dumps(dict(path.hparams)), path.score, path.parent_id,
                    json.dumps(dict(path.metrics)), version))
            if task is not None:
                for pid, count in selections.items():
                    db.execute("INSERT INTO selections VALUES (?,?,?) ON CONFLICT(path_id, task) "
                               "DO UPDATE SET count=excluded.count", (pid, task, count))
                if iteration_done:
                    db.execute("UPDATE tasks SET iterations_done=iterations_done+1 WHERE name=?", (task,))
                if path is not None:
                    db.execute("UPDATE tasks SET state='serving', error=NULL WHERE name=?", (task,))
            if pin and path is not None and path.task is not None:
                db.execute("UPDATE tasks SET pinned=1, paused_version=NULL, rolled_back_version=? WHERE name=?",
                           (version, path.task))
            doomed = self._unreferenced_components(db)
        self._delete_component_files(doomed)
        return version

    # ---- deletion and garbage collection ------------------------------------------------

    def remove_orphans(self, min_age_seconds: float = 3600.0) -> dict[str, int]:
        """Removes what a process killed mid-write leaves behind: temporary files, array files
        no component row references, dataset directories no task references, and upload
        spool directories (``uploads-*``). Returns the count removed per kind.

        Only safe while nothing else writes to the store: ``mu2net serve`` calls it at start,
        holding the evolver lock (:func:`evolver_lock`), before it accepts uploads. Dataset
        and upload directories are removed only when older than ``min_age_seconds`` (another
        server on the same store may be writing a young one), and dataset directories are
        matched by their name under ``datasets/`` (a moved store keeps its datasets); if no
        task's dataset is found there at all, no dataset directory is removed.
        """
        removed = {"temporary_files": 0, "arrays": 0, "datasets": 0, "upload_dirs": 0}
        with self._lock:
            rows = self._db.execute("SELECT params_digest, opt_digest FROM components").fetchall()
            live = {d for r in rows for d in r if d}
            dirs = [FsPath(r[0]).parts for r in self._db.execute("SELECT dataset_dir FROM tasks")]
        # the folder under datasets/ each task's dataset lives in, wherever the store was when written
        referenced = {p[p.index("datasets") + 1] for p in dirs if "datasets" in p[:-1]}
        cutoff = time.time() - min_age_seconds
        arrays = self.data_dir / "arrays"
        for f in arrays.rglob("*") if arrays.exists() else []:
            if f.is_file() and f.name.endswith(".tmp"):
                f.unlink(missing_ok=True)
                removed["temporary_files"] += 1
            elif f.is_file() and f.suffix == ".npz" and f.stem not in live:
                f.unlink(missing_ok=True)
                removed["arrays"] += 1
        root = self.data_dir / "datasets"
        present = {d.name for d in root.iterdir()} if root.exists() else set()
        if not dirs or referenced & present:  # else the tasks' paths do not match this store: keep all
            for d in root.iterdir() if root.exists() else []:
                if d.is_dir() and d.name not in referenced and d.stat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True)
                    removed["datasets"] += 1
        for d in self.data_dir.glob("uploads-*"):
            if d.is_dir() and d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
                removed["upload_dirs"] += 1
        return removed

    def verify(self) -> list[str]:
        """Checks the store's invariants (what a process killed at any moment must leave
        intact); returns the problems found, empty when there are none.

        Checked: SQLite's ``PRAGMA integrity_check``; every component's array files exist and
        hash to their digests; every retained path's components are in the layer pool; every
        task's recorded dataset directory exists; the system version is at least every
        publish's version in the history. Leftovers that :meth:`remove_orphans` removes
        (temporary files, unreferenced array files) are not problems. Run it on a store no
        process is writing to (rows and files are read one after another, so a publish or
        delete in between can show as a missing file or component).
        """
        problems: list[str] = []
        with self._lock:
            check = [r[0] for r in self._db.execute("PRAGMA integrity_check").fetchall()]
        if check != ["ok"]:
            problems.append(f"SQLite integrity_check: {'; '.join(check)[:500]}")
        components = {c.id: c for c in self.list_components()}
        for c in components.values():
            for digest in (c.params_digest, c.opt_digest):
                if digest is None:
                    continue
                try:
                    data = self._array_path(digest).read_bytes()
                except FileNotFoundError:
                    problems.append(f"component {c.id}: array file {digest} is missing")
                    continue
                if hashlib.sha256(data).hexdigest() != digest:
                    problems.append(f"component {c.id}: array file {digest} does not match its digest")
        for p in self.list_paths():
            gone = [cid for cid in p.component_ids if cid not in components]
            if gone:
                problems.append(f"path {p.id} (task {p.task}) uses components {gone} not in the layer pool")
        for t in self.list_tasks():
            if not FsPath(t.dataset_dir).is_dir():
                problems.append(f"task {t.name}: dataset directory {t.dataset_dir} is missing")
        version = self.system_version()
        last = max((h["system_version"] for h in self.history()), default=0)
        if last > version:
            problems.append(f"system version {version} is below the history's latest publish {last}")
        return problems

    def _unreferenced_components(self, db: sqlite3.Connection) -> list[tuple[str, str | None]]:
        """Deletes component rows no retained path uses; returns their digests."""
        used: set[str] = set()
        for r in db.execute("SELECT component_ids FROM paths"):
            used.update(json.loads(r[0]))
        doomed = [(r["id"], r["params_digest"], r["opt_digest"])
                  for r in db.execute("SELECT id, params_digest, opt_digest FROM components")
                  if r["id"] not in used]
        for cid, _, _ in doomed:
            db.execute("DELETE FROM components WHERE id=?", (cid,))
        live = {d for r in db.execute("SELECT params_digest, opt_digest FROM components") for d in r if d}
        return [(p, o) for _, p, o in doomed if p not in live]

    def _delete_component_files(self, doomed: Iterable[tuple[str, str | None]]) -> None:
        """Unlinks the array files of deleted component rows, each inside a write transaction
        that first checks no component row references the digest: a publish (another process)
        that reused the same content-addressed file after the rows went keeps it."""
        for pd, od in doomed:
            for d in (pd, od):
                if d:
                    with self.transaction() as db:
                        if db.execute("SELECT 1 FROM components WHERE params_digest=? OR opt_digest=? LIMIT 1",
                                      (d, d)).fetchone():
                            continue
                        with contextlib.suppress(FileNotFoundError):
                            self._array_path(d).unlink()

    def delete_task(self, name: str) -> list[str]:
        """Deletes a task, its path and every component trained on its data.

        Components whose provenance shows training steps on ``name`` are removed from the
        layer pool (for a private task this removes all knowledge of its dataset, paper
        Section 3.4); any other path using one of them (only possible inside the task's
        ACL group) is deleted too and its task is queued again. Components then used by
        no path are garbage collected.

        Returns:
          Names of the other tasks that lost their path and were re-queued.

        Raises:
          TaskNotFound: if there is no such task.
        """
        task = self.get_task(name)
        with self.transaction() as db:
            self._refuse_mirror(db, "deleting a task")
            if not db.execute("SELECT 1 FROM tasks WHERE name=?", (name,)).fetchone():
                raise TaskNotFound(f"unknown task {name!r}")
            db.execute("DELETE FROM paths WHERE task=?", (name,))
            db.execute("DELETE FROM selections WHERE task=?", (name,))
            db.execute("DELETE FROM history WHERE task=?", (name,))
            tainted = {r["id"] for r in db.execute("SELECT id, steps FROM components")
                       if name in json.loads(r["steps"])}
            requeued = []
            for r in db.execute("SELECT id, task, component_ids FROM paths").fetchall():
                if tainted & set(json.loads(r["component_ids"])):
                    db.execute("DELETE FROM paths WHERE id=?", (r["id"],))
                    if r["task"] is not None:
                        requeued.append(r["task"])
                        db.execute("UPDATE tasks SET state='queued', iterations_done=0, stale_iterations=0, "
                                   "paused_version=NULL, pinned=0 WHERE name=?",
                                   (r["task"],))
            db.execute("DELETE FROM tasks WHERE name=?", (name,))
            version = int(db.execute("SELECT value FROM meta WHERE key='system_version'").fetchone()[0])
            db.execute("UPDATE meta SET value=? WHERE key='system_version'", (str(version + 1),))
            doomed = self._unreferenced_components(db)
        self._delete_component_files(doomed)
        shutil.rmtree(task.dataset_dir, ignore_errors=True)
        return requeued


def is_digest(text: Any) -> bool:
    """Whether ``text`` is a sha256 hex digest (64 lowercase hex characters), as array files are named."""
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def new_id() -> str:
    """A fresh path id."""
    return uuid.uuid4().hex


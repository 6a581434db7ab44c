"""The model repository: what serving replicas on other hosts read (README.md, "More than one
machine"; docs/design.md, "Model repository and replicas").

The store (:mod:`mu2net.store`) is the evolver host's single source of truth; SQLite does
not travel over a network. The primary server writes the store's state to a repository at
a URL (fsspec: a local directory by default, ``s3://``, ``gs://``, ...) whenever it changes,
the way TF Serving and Triton poll a model base path:

* ``arrays/<aa>/<sha256>.npz``: content-addressed component parameters (the store's own
  files, checked against their digests, so a component shared by many paths and versions
  is written once);
* ``versions/<system version, 12 digits>.<revision, 6 digits>.json``: immutable manifests.
  One holds the rows of the tasks, retained paths (architecture, hparams, metrics),
  components (kind, parameter digest, provenance), publish history and evolver status
  (:meth:`mu2net.store.Store.export_state`). A system version changes only with a publish or
  a delete (a rollback is a publish); a change of the task rows alone (an upload queued, a
  task failed or woken, samples counted) is a new revision of the same system version;
* ``latest.json``: the version pointer ``{"store_id", "system_version", "revision",
  "manifest", "state", "previous_revision"}``, written after the manifest and its arrays, and moved forward only.
  On a local directory files are written through a temporary name, fsync and rename; on an
  object store a single PUT is atomic.

A repository belongs to one store (the pointer's ``store_id``), and one process exports to
it at a time (``export.lock`` in the store's directory).

Retention follows TF Serving's version policy: the newest revision of each of the newest
``keep`` system versions (:data:`DEFAULT_KEEP`) stays readable, and the revision the
pointer named before, so a replica that read the pointer just before an export can still
load the manifest it names, and a task can be rolled back to a retained path. Older
manifests are collected after each export, and with them the arrays no retained manifest
uses. A manifest that holds a task the newest manifest no longer
has (deleted: paper Section 3.4's removal of a task's knowledge) is collected whatever its
age.

A replica (``mu2net serve --no-evolver --repository URL``) mirrors the pointed-to manifest
into a local store (:meth:`Repository.sync`), from which its snapshot loader hot-swaps as
the primary's does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path as FsPath
from types import EllipsisType
from typing import Any, Callable

import fsspec

from mu2net.store import Store, StoreError, is_digest, write_file_atomic

log = logging.getLogger("mu2net.repository")

#: System versions kept readable (TF Serving's ``latest`` version policy with N = 2).
DEFAULT_KEEP = 2
#: Format of the manifests and the pointer; a reader refuses any other.
FORMAT = 1
POINTER = "latest.json"
#: Parsed manifests a :class:`Repository` keeps in memory (they never change once written).
MANIFEST_CACHE = 128
#: Lock file, in the store's directory, of the one process that exports the store.
EXPORT_LOCK = "export.lock"


class RepositoryError(Exception):
    """The repository is unreadable, holds something this version cannot read, or belongs
    to another store."""


class ManifestGone(RepositoryError):
    """The system version's manifest is not retained (collected, or never written)."""


def state_key(state: dict[str, Any]) -> str:
    """sha256 of a store state's rows (:meth:`mu2net.store.Store.export_state`) without the
    evolver status, which changes every cycle: what decides whether a new revision is
    written."""
    rows = {k: v for k, v in state.items() if k != "evolver_status"}
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


class Repository:
    """A model repository at ``url`` (any fsspec URL; a plain path is a local directory).

    Args:
      url: e.g. ``/srv/mu2net-repo``, ``file:///srv/mu2net-repo``, ``s3://bucket/prefix``.
      storage_options: passed to the fsspec filesystem (e.g. ``endpoint_url`` for an
        S3-compatible server; fsspec also reads them from ``FSSPEC_S3_ENDPOINT_URL``-style
        environment variables).

    Raises:
      ValueError: an empty URL; ImportError / ValueError from fsspec for a protocol whose
        package is not installed or a malformed URL.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        if not url:
            raise ValueError("the repository URL is empty; give a directory or an fsspec URL such as s3://bucket/prefix")
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self._manifests: dict[str, dict[str, Any]] = {}  # name -> parsed manifest (immutable files)
        self._cache_lock = threading.Lock()  # the exporter's thread and rollback requests share the cache
        self._present: set[str] = set()  # digests this process wrote or saw in the repository
        #: whether this process has run :meth:`collect` since its last write (a process killed,
        #: or a collect that raised, between a pointer write and its collect leaves it pending)
        self.collected = False
        self._swept = False  # whether this process's collect has listed every array once
        protocol = self.fs.protocol
        self._local = "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))

    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _array_path(self, digest: str) -> str:
        return self._path("arrays", digest[:2], f"{digest}.npz")

    @staticmethod
    def _manifest_name(version: int, revision: int) -> str:
        return f"versions/{version:012d}.{revision:06d}.json"

    def _put(self, path: str, data: bytes) -> None:
        """Writes ``path`` whole or not at all: via a temporary name, fsync and a rename on a
        local directory, one PUT on an object store."""
        if self._local:
            write_file_atomic(FsPath(path), data)
        else:
            self.fs.pipe_file(path, data)

    def _read_json(self, path: str) -> Any:
        """Parsed JSON of ``path``; FileNotFoundError if it does not exist."""
        data = self.fs.cat_file(path)
        try:
            return json.loads(data)
        except ValueError as e:
            raise RepositoryError(f"{path} is not valid JSON: {e}") from None

    # ---- reading ------------------------------------------------------------------------

    def pointer(self) -> dict[str, Any] | None:
        """The version pointer (``store_id``, ``system_version``, ``revision``, ``manifest``,
        ``state``, ``previous_revision``: the revision of the same version it named before, or
        None), or None before the first export.

        Raises:
          RepositoryError: if it is malformed or of another format.
        """
        try:
            p = self._read_json(self._path(POINTER))
        except FileNotFoundError:
            return None
        ok = (isinstance(p, dict) and p.get("format") == FORMAT and isinstance(p.get("store_id"), str)
              and all(isinstance(p.get(k), int) and not isinstance(p.get(k), bool) and p[k] >= 0
                      for k in ("system_version", "revision"))
              and p.get("manifest") == self._manifest_name(p["system_version"], p["revision"])
              and (p.get("previous_revision") is None or (isinstance(p["previous_revision"], int)
                                                          and not isinstance(p["previous_revision"], bool))))
        if not ok:
            raise RepositoryError(f"{self._path(POINTER)} is not a format-{FORMAT} version pointer: {p!r:.200}")
        return dict(p)

    def latest(self) -> int | None:
        """The system version the pointer names, or None before the first export."""
        p = self.pointer()
        return None if p is None else int(p["system_version"])

    def _manifest_names(self) -> dict[tuple[int, int], str]:
        self.fs.invalidate_cache()  # an object store's listing cache may predate another process's writes
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self._path("versions"), detail=False)]
        except FileNotFoundError:
            return {}
        out = {}
        for n in names:
            parts = n.split(".")
            if len(parts) == 3 and parts[2] == "json" and parts[0].isdigit() and parts[1].isdigit():
                out[(int(parts[0]), int(parts[1]))] = f"versions/{n}"
        return out

    def _published_names(self, pointer: dict[str, Any] | None | EllipsisType = ...) -> dict[tuple[int, int], str]:
        """:meth:`_manifest_names` without those newer than the pointer (written by an export
        that stopped before moving the pointer; the next export writes past them); ``pointer``:
        the pointer as the caller just read it (default: read it)."""
        names = self._manifest_names()
        if pointer is ...:
            pointer = self.pointer()
        if pointer is None:
            return {}
        current = (pointer["system_version"], pointer["revision"])
        return {k: n for k, n in names.items() if k <= current}

    def versions(self) -> list[int]:
        """System versions with a retained manifest the pointer has reached, oldest first."""
        return sorted(self.retained())

    def retained(self) -> dict[int, int]:
        """System version -> its newest retained revision, for every version with a manifest
        the pointer has reached (one read of the pointer and one listing: pass the revision
        to :meth:`manifest` to read several versions without listing again)."""
        newest: dict[int, int] = {}
        for v, r in self._published_names():
            newest[v] = max(r, newest.get(v, r))
        return newest

    def manifest(self, version: int, revision: int | None = None) -> dict[str, Any]:
        """The manifest of ``version`` (its newest retained revision unless ``revision``):
        :meth:`mu2net.store.Store.export_state`'s dict with ``format``, ``revision`` and
        ``exported_at``.

        Raises:
          ManifestGone: if it is not retained (collected, or never written).
          RepositoryError: if it is malformed.
        """
        if revision is None:
            revisions = sorted(r for v, r in self._published_names() if v == version)
            if not revisions:
                raise ManifestGone(f"system version {version} is not in the repository {self.url} "
                                      f"(retained: {self.versions()})")
            revision = revisions[-1]
        name = self._manifest_name(version, revision)
        with self._cache_lock:
            if name in self._manifests:
                return self._manifests[name]
        try:
            m = self._read_json(self._path(name))
        except FileNotFoundError:
            raise ManifestGone(f"{name} is not in the repository {self.url} (collected since; retained system "
                                  f"versions: {self.versions()})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("system_version") != version \
                or m.get("revision") != revision:
            raise RepositoryError(f"manifest {name} is malformed or of another format")
        for key in ("tasks", "paths", "components", "history"):
            if not isinstance(m.get(key), list) or not all(isinstance(r, dict) for r in m[key]):
                raise RepositoryError(f"manifest {name}: {key!r} must be a list of rows")
        for c in m["components"]:
            if not is_digest(c.get("params_digest")):
                raise RepositoryError(f"manifest {name}: component {c.get('id')!r} has no sha256 parameter digest")
        with self._cache_lock:
            if len(self._manifests) >= MANIFEST_CACHE:
                self._manifests.pop(next(iter(self._manifests)))
            self._manifests[name] = m
        return m

    def read_array(self, digest: str) -> bytes:
        """The ``.npz`` bytes of ``digest``, checked against it.

        Raises:
          RepositoryError: if it is missing or does not hash to ``digest``.
        """
        if not is_digest(digest):
            raise RepositoryError(f"{digest!r} is not a sha256 hex digest")
        try:
            data = self.fs.cat_file(self._array_path(digest))
        except FileNotFoundError:
            raise RepositoryError(f"array {digest} is missing from the repository {self.url}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise RepositoryError(f"array {digest} in the repository {self.url} does not match its digest")
        return bytes(data)

    # ---- writing (the primary) ----------------------------------------------------------

    def export(self, store: Store, keep: int = DEFAULT_KEEP) -> int | None:
        """Writes the store's current state if it changed since the pointer's: missing
        arrays (checked against their digests), then the manifest (a new system version,
        or a new revision of the pointer's), then the pointer; then collects what the
        retention policy no longer keeps. Call it from the one exporting process
        (:func:`exporter` holds the store's export lock).

        Returns:
          The system version written, or None when the pointer already holds this state.

        Raises:
          ValueError: if ``keep`` < 1.
          RepositoryError: if the repository belongs to another store, or its pointer is
            ahead of the store (a store restored from a backup): give that store a
            repository of its own.
          StoreError: if a component's array file vanished meanwhile (a publish superseded
            it) or does not match its digest; the next export writes the newer state.
        """
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (system versions kept readable), got {keep}")
        if self._local:
            self.fs.makedirs(self.root, exist_ok=True)
        state = store.export_state()
        version, key = int(state["system_version"]), state_key(state)
        pointer = self.pointer()
        if pointer is not None:
            if pointer["store_id"] != state["store_id"]:
                raise RepositoryError(f"the repository {self.url} belongs to the store {pointer['store_id']}, not to "
                                      f"{state['store_id']} ({store.data_dir}); give each store a repository of its "
                                      f"own")
            if pointer["system_version"] > version:
                raise RepositoryError(f"the repository {self.url} is at system version {pointer['system_version']}, "
                                      f"ahead of the store {store.data_dir} at {version} (restored from a backup?); "
                                      f"the pointer never moves back: give the store a new repository")
            if pointer["system_version"] == version:
                if pointer["state"] == key:
                    if not self.collected:
                        self.collect(keep)  # the last writer stopped (or its collect failed) before it
                    return None
        # past every manifest of the version listed, the pointer's and any an export that stopped
        # before its pointer write left (a manifest's name is never written twice)
        revision = max((r + 1 for v, r in self._manifest_names() if v == version), default=0)
        self.fs.invalidate_cache()
        for c in state["components"]:
            digest = c["params_digest"]
            target = self._array_path(digest)
            if digest not in self._present and not self.fs.exists(target):
                try:
                    data = store.array_file(digest).read_bytes()
                except FileNotFoundError:
                    raise StoreError(f"component {c['id']}: its array file {digest} was deleted during the export "
                                     f"of system version {version}") from None
                if hashlib.sha256(data).hexdigest() != digest:
                    raise StoreError(f"component {c['id']}: its array file {digest} in {store.data_dir} does not "
                                     f"match its digest; not exported")
                self._put(target, data)
            self._present.add(digest)
        name = self._manifest_name(version, revision)
        manifest = {"format": FORMAT, "revision": revision, "exported_at": time.time(), **state}
        self.collected = False
        self._put(self._path(name), json.dumps(manifest).encode())
        self._put(self._path(POINTER), json.dumps({
            "format": FORMAT, "store_id": state["store_id"], "system_version": version, "revision": revision,
            "manifest": name, "state": key,
            # the revision the pointer named before, of the same version (collect keeps it)
            "previous_revision": pointer["revision"] if pointer is not None
            and pointer["system_version"] == version else None}).encode())
        self.collect(keep)
        return version

    def collect(self, keep: int = DEFAULT_KEEP) -> dict[str, int]:
        """Keeps the newest revision of each of the newest ``keep`` system versions (and the
        one the pointer names, and the revision of that version it named before), except manifests holding a task the pointed-to manifest no
        longer has (deleted); deletes every other manifest, then every array no kept
        manifest uses (listed only when a manifest was deleted, and at a process's first
        collect). Returns the counts deleted (``manifests``, ``arrays``)."""
        pointer = self.pointer()
        if pointer is None:  # nothing published: nothing is known to be unused
            return {"manifests": 0, "arrays": 0}
        names = self._published_names(pointer)  # an unpublished manifest is the next export's to write past
        newest: dict[int, int] = {}
        for v, r in names:
            newest[v] = max(r, newest.get(v, -1))
        kept = {(v, newest[v]) for v in sorted(newest)[-keep:]}
        current = (pointer["system_version"], pointer["revision"])
        kept.add(current)
        # and the pointer's previous revision (same arrays): a replica that read the pointer just
        # before this export's still finds the manifest it names
        previous = pointer.get("previous_revision")
        if previous is not None and (current[0], previous) in names:
            kept.add((current[0], previous))
        live_tasks = {(t["name"], t["seq"]) for t in self.manifest(*current)["tasks"]}
        # a task is (name, seq): one deleted and uploaded again under its name is another task
        kept = {k for k in kept if k == current
                or {(t["name"], t["seq"]) for t in self.manifest(*k)["tasks"]} <= live_tasks}
        doomed = [names[k] for k in names if k not in kept]
        for name in doomed:
            self.fs.rm_file(self._path(name))
        live = {c["params_digest"] for k in kept if k in names for c in self.manifest(*k)["components"]}
        arrays = 0
        files: list[str] = []
        # an array loses its last reference only with a deleted manifest; the first collect of a
        # process also sweeps what an export that died before its manifest write left
        sweep = bool(doomed) or not self._swept
        if sweep:
            with contextlib.suppress(FileNotFoundError):
                files = self.fs.find(self._path("arrays"))
        for f in files:
            base = f.rsplit("/", 1)[-1]
            if base.endswith(".npz") and base[:-4] not in live:
                self.fs.rm_file(f)
                self._present.discard(base[:-4])
                arrays += 1
        with self._cache_lock:
            for name in doomed:
                self._manifests.pop(name, None)
        self._swept = self._swept or sweep  # only once every unused array is gone (a failed one sweeps again)
        self.collected = True
        return {"manifests": len(doomed), "arrays": arrays}

    # ---- reading into a mirror (a replica) ----------------------------------------------

    def sync(self, mirror: Store) -> int | None:
        """Makes ``mirror`` (a replica's local store) hold the pointed-to manifest when it
        differs from the one it holds: the arrays it lacks are copied (checked against
        their digests), then :meth:`mu2net.store.Store.import_state` swaps the rows in one
        transaction. Returns the system version now mirrored, or None if nothing changed.

        Raises:
          RepositoryError: if the mirror is no mirror, the repository has no pointer yet
            (nothing exported there: a wrong URL, or the evolver host not started), or the
            manifest cannot be read whole (e.g. collected between the pointer's read and the
            manifest's: the next sync reads the newer pointer).
        """
        if mirror.mirror_of() is None:
            raise RepositoryError(f"store {mirror.data_dir} is not a mirror (Store.make_mirror)")
        pointer = self.pointer()
        if pointer is None:
            raise RepositoryError(f"the repository {self.url} has no version pointer yet (is the evolver host's "
                                  f"server running with --repository {self.url}?)")
        held = mirror.mirrored_manifest()
        if held is not None and held.get("store_id") == pointer["store_id"] and (
                (held["system_version"], held["revision"]) >= (pointer["system_version"], pointer["revision"])):
            return None  # nothing newer (a pointer never moves back within one store's repository)
        manifest = self.manifest(pointer["system_version"], pointer["revision"])
        mirror.fetch_missing_arrays((c["params_digest"] for c in manifest["components"]), self.read_array)
        mirror.import_state(manifest)
        return int(pointer["system_version"])


def exporter(store: Store, repository: Repository, keep: int = DEFAULT_KEEP) -> Callable[[], int | None]:
    """The primary's export step for a :class:`Poller`: takes the store's export lock
    (``DIR/export.lock``, filelock, without waiting) on its first call, then exports the
    store's state when it changed (:meth:`Repository.export`). A poll with no commit to the
    store since the last successful export (:meth:`mu2net.store.Store.change_mark`) reads
    nothing else.

    Raises (from the step):
      RepositoryError: while another process holds the lock (a second server on the store).
    """
    import filelock

    # held by the process, whichever thread polls (filelock's default lock is per thread)
    lock = filelock.FileLock(os.path.join(os.fspath(store.data_dir), EXPORT_LOCK), thread_local=False)
    exported: list[tuple[int, int] | None] = [None]  # the change mark of the last successful export
    one_at_a_time = threading.Lock()  # the poller's thread and a last poll at shutdown

    def export() -> int | None:
        with one_at_a_time:
            return _export()

    def _export() -> int | None:
        if not lock.is_locked:
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                raise RepositoryError(f"another process exports the store {store.data_dir} (it holds "
                                      f"{lock.lock_file}); one server per store writes its repository") from None
        mark = store.change_mark()  # read before the state: a commit during the export shows next time
        if mark == exported[0] and repository.collected:
            return None
        version = repository.export(store, keep)
        exported[0] = mark
        return version
    return export


class Poller:
    """Calls ``work`` every ``poll_seconds`` on a daemon thread until :meth:`stop`; an
    exception is logged (once per distinct message) and the next poll tries again.

    Args:
      name: thread name and log prefix.
      work: the call; its non-None results are the versions written or mirrored.
      poll_seconds: seconds between calls.
      repository: the repository it exports to or mirrors (for status views and rollbacks).

    Attributes:
      last_error: the last exception's text, None after a success.
      last_result: what the last successful call returned.
    """

    def __init__(self, name: str, work: Callable[[], Any], poll_seconds: float = 0.5,
                 repository: Repository | None = None) -> None:
        self.name, self.work, self.poll_seconds, self.repository = name, work, poll_seconds, repository
        self.url = repository.url if repository is not None else ""
        self.last_error: str | None = None
        self.last_result: Any = None
        #: the last non-None result (the version last exported or mirrored)
        self.last_version: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def poll(self) -> Any:
        """One call of ``work`` on the caller's thread (errors recorded and logged, not raised)."""
        try:
            self.last_result = self.work()
        except Exception as e:
            text = f"{type(e).__name__}: {e}"
            if text != self.last_error:
                log.warning("%s failed (retrying every %.1fs): %s", self.name, self.poll_seconds, text)
            self.last_error = text
            return None
        self.last_error = None
        if self.last_result is not None:
            self.last_version = self.last_result
        return self.last_result

    def start(self, poll_first: bool = True) -> "Poller":
        """Starts polling; with ``poll_first`` the first call runs on the caller's thread first."""
        if poll_first:
            self.poll()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

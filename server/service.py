"""The service: domain logic shared by the gRPC and HTTP front ends.

Reads the current snapshot once per request, decodes and validates images, batches the
forward pass, and exposes tasks, uploads, deletion and system information. Blocking work
(store, dataset ingestion, image decoding of large batches) runs in worker threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import hmac
import io
import math
import threading
import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np

from mu2net import archives as A
from mu2net import datasets as D
from mu2net.ingest import add_task_arrays
from mu2net.store import Store, TaskRecord
from mu2net.server import errors as E
from mu2net.server.batcher import Batcher
from mu2net.server.snapshot import ServedPath, Snapshot, SnapshotManager

MAX_IMAGE_SIDE = 4096
MAX_IMAGES_PER_REQUEST = 8192
#: Keys of one point of a task resource's ``history``.
#: The bearer token of the request being handled, or None: set by the HTTP and gRPC front ends
#: for each request (``Authorization: Bearer ...``; gRPC metadata ``authorization``) and read by
#: :meth:`Service.visible`. A context variable, so it follows the request into
#: ``asyncio.to_thread``.
CALLER_TOKEN: contextvars.ContextVar[str | None] = contextvars.ContextVar("mu2net_caller_token", default=None)

def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` value (HTTP header or gRPC metadata), else None."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:]
    return None


def _token_matches(token: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with an expected one."""
    return token is not None and hmac.compare_digest(token.encode(), expected.encode())


HISTORY_KEYS = ("system_version", "time", "validation_accuracy", "test_accuracy")


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Server limits.

    Attributes:
      max_batch_size: most images per forward call (dynamic batching).
      max_delay_ms: longest wait for more requests to fill a batch.
      max_upload_bytes: cap of an uploaded dataset body.
      max_message_bytes: cap of a gRPC message / classify body.
      max_archive_bytes: cap of an uploaded archive's uncompressed size (zip bomb guard).
      admin_token: bearer token required by upload and delete (None: no auth).
      read_tokens: ACL group -> bearer token that reads that group's private tasks. When the
        server has an admin token or read tokens, a private task is visible (listed, read,
        classified, its labels and metrics shown) only to a caller presenting the admin
        token or its group's read token; to anyone else it does not exist (404 / NOT_FOUND,
        the same answer as an unknown name). Without either, every task is visible.
      max_queued_images: most images queued for the forward pass at once; more is refused
        with 429 / RESOURCE_EXHAUSTED and a retry hint (None: unbounded).
      deadline_admission: a request with a deadline (a gRPC deadline, the Open Inference
        Protocol's ``timeout`` parameter, HTTP ``timeout_ms``) is refused the same way at once
        when the queued work is estimated to outlast its deadline (see
        :mod:`mu2net.server.batcher`), instead of queueing to expire unrun.
      max_concurrent_uploads: uploads received or ingested at once (each may spool and
        extract up to the archive cap); one more is refused with 429 and a retry hint.
        Ingestion runs on threads of its own, off the classify path.
      max_concurrent_requests: requests handled at once over gRPC and HTTP together; one
        more is refused at once with 429 / RESOURCE_EXHAUSTED and a retry hint (None:
        unbounded). Liveness, readiness and metrics (:data:`UNBOUNDED_METHODS`) are not
        counted, so probes and monitoring still answer; uploads are not either (they have
        ``max_concurrent_uploads``). An HTTP classify or inference request takes its slot
        once its body is read, so a client sending a body slowly holds none; a gRPC message
        has been received whole before its call is counted. It bounds the decoded images
        waiting for the batcher's queue, and the work in progress.
      cross_task_batching: merge requests of paths that differ only in their heads into one
        forward call (:mod:`mu2net.server.grouping`).
      replica: this server mirrors a model repository (:mod:`mu2net.repository`) and
        stores nothing itself: uploads, deletes, evolve and rollback requests go to ``ingest_url``.
      ingest_url: HTTP base URL of the evolver host's server a replica forwards writes to
        (None: a replica refuses them with 503).
    """

    max_batch_size: int = 64
    max_delay_ms: float = 2.0
    max_upload_bytes: int = 512 << 20
    max_message_bytes: int = 64 << 20
    max_archive_bytes: int = A.MAX_ARCHIVE_BYTES
    admin_token: str | None = None
    max_queued_images: int | None = 16384
    deadline_admission: bool = True
    max_concurrent_uploads: int = 2
    max_concurrent_requests: int | None = 512
    cross_task_batching: bool = True
    read_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    replica: bool = False
    ingest_url: str | None = None


#: Handlers that :meth:`Service.request_slot` does not count: liveness and readiness probes
#: (Open Inference Protocol REST and gRPC), the Prometheus scrape, and uploads (bounded by
#: ``max_concurrent_uploads`` instead).
UNBOUNDED_METHODS = frozenset({"v2_live", "v2_ready", "metrics", "ServerLive", "ServerReady", "upload"})


@dataclasses.dataclass(frozen=True)
class ClassifyResult:
    """Top-k per image, and the version/path that answered."""

    label_ids: np.ndarray   # [N, k] int32
    scores: np.ndarray      # [N, k] float32, decreasing
    labels: list[list[str]]
    probabilities: np.ndarray  # [N, classes] float32
    system_version: int
    path_id: str


def decode_images(encoded: Sequence[bytes], shape: tuple[int, int, int]) -> np.ndarray:
    """Decodes encoded images to ``[N, H, W, C] uint8`` at the task's stored shape.

    Raises:
      InvalidArgument: naming the index of an undecodable image.
    """
    from PIL import Image

    out = np.empty((len(encoded), *shape), np.uint8)
    for i, data in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(data)) as im:
                # the header's size is checked before anything is decoded (decompression bombs)
                if im.width > MAX_IMAGE_SIDE or im.height > MAX_IMAGE_SIDE:
                    raise E.InvalidArgument(f"image {i} is {im.width}x{im.height}; at most {MAX_IMAGE_SIDE} per side")
                im.load()
                out[i] = _conform(im, shape)
        except E.InvalidArgument:
            raise
        except Image.DecompressionBombError as e:
            raise E.InvalidArgument(f"image {i} ({len(data)} bytes) is too large to decode: {e}") from e
        except Exception as e:  # a plugin's own errors on a crafted image too
            raise E.InvalidArgument(f"image {i} ({len(data)} bytes) is not a decodable image: {e}") from e
    return out


def _conform(im: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """A PIL image as ``[H, W, C] uint8`` at a task's stored shape (gray or RGB, bilinear resize)."""
    from PIL import Image

    h, w, c = shape
    converted = im.convert("L" if c == 1 else "RGB")
    if converted.size != (w, h):
        converted = converted.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(converted, np.uint8).reshape(h, w, -1)
    return arr[..., :c] if c in (1, 3) else np.repeat(arr[..., :1], c, -1)


def conform_raw(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Brings a raw ``[N, H, W, C] uint8`` tensor to a task's stored image shape, as encoded
    images are: one input shape per task reaches the compiled forward function, so a
    client's odd shape costs no compilation (which would stall every task's batches).
    Channels: 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA (alpha dropped)."""
    if images.shape[1:] == tuple(shape):
        return images
    from PIL import Image

    modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
    mode = modes[images.shape[-1]]
    return np.stack([_conform(Image.fromarray(img[..., 0] if mode == "L" else img, mode), shape) for img in images])


def raw_images(shape: Sequence[Any], data: bytes, what: str = "raw tensor") -> np.ndarray:
    """A raw tensor ``[N, H, W, C] uint8`` (row-major) from its shape and bytes, for every
    front end (gRPC Classify, the HTTP JSON body, the Open Inference Protocol's UINT8 input).

    The shape is checked against the byte count in exact integer arithmetic before anything
    is allocated, so a shape claiming terabytes over a few bytes, negative or non-integer
    dimensions, or a product that wraps around in 64 bits are refused.

    Raises:
      InvalidArgument: ``shape`` is not 4 non-negative integers whose product is ``len(data)``.
    """
    dims = list(shape)
    if (len(dims) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)
            or math.prod(dims) != len(data)):
        raise E.InvalidArgument(f"{what} shape {dims} does not match its {len(data)} bytes; allowed: [N, H, W, C] "
                                "uint8 row-major")
    return np.frombuffer(data, np.uint8).reshape(dims)


def check_raw(images: np.ndarray) -> np.ndarray:
    """Validates a raw uint8 tensor ``[N, H, W, C]`` (C in 1..4)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 2, 3, 4) or 0 in images.shape:
        raise E.InvalidArgument(f"raw images have shape {list(images.shape)}; allowed: [N, H, W, C] with "
                                "N, H, W >= 1 and C in 1..4")
    if max(images.shape[1:3]) > MAX_IMAGE_SIDE:
        raise E.InvalidArgument(f"raw images are {images.shape[1]}x{images.shape[2]}; at most {MAX_IMAGE_SIDE} per side")
    return images


class Service:
    """Everything the front ends call.

    Args:
      store: the store shared with the evolver process.
      config: limits and auth.
      manager: snapshot manager (created if not given).
      metrics: optional metrics sink (see :mod:`server.metrics`).
    """

    def __init__(self, store: Store, config: ServiceConfig = ServiceConfig(), manager: SnapshotManager | None = None,
                 metrics: Any = None) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.manager = manager or SnapshotManager(store, config.max_batch_size,
                                                  on_swap=metrics.on_swap if metrics else None,
                                                  cross_task=config.cross_task_batching)
        self.upload_slots = threading.BoundedSemaphore(config.max_concurrent_uploads)
        self.ingest_pool = concurrent.futures.ThreadPoolExecutor(config.max_concurrent_uploads,
                                                                 thread_name_prefix="ingest")
        self._requests = 0  # requests in progress (request_slot), gRPC and HTTP together
        self._requests_lock = threading.Lock()
        #: the model repository's export (primary) or sync (replica) poller, set by ``serve``
        self.repository: Any = None
        self._ingesting = 0  # uploads being validated and stored right now (upload_file calls)
        self._ingesting_lock = threading.Lock()
        self.batcher = Batcher(config.max_batch_size, config.max_delay_ms,
                               on_batch=metrics.on_batch if metrics else None,
                               max_queued_images=config.max_queued_images,
                               deadline_admission=config.deadline_admission, cross_task=config.cross_task_batching)
        if metrics is not None:
            metrics.watch_batcher(self.batcher)

    # ---- visibility of private tasks ----------------------------------------------------

    def visible(self, task: TaskRecord) -> bool:
        """Whether the caller (:data:`CALLER_TOKEN`) may see ``task`` (see
        :attr:`ServiceConfig.read_tokens`); tokens compared in constant time."""
        cfg = self.config
        if not task.private:
            return True
        if cfg.admin_token is None and not cfg.read_tokens:
            # an open server shows every task; a replica without tokens does not know who may
            # see the private tasks it mirrors (the evolver host may have tokens): nobody
            return not cfg.replica
        token = CALLER_TOKEN.get()
        allowed = [t for t in (cfg.admin_token, cfg.read_tokens.get(task.acl_group or task.name)) if t is not None]
        return any(_token_matches(token, t) for t in allowed)

    def _unknown(self, name: str) -> E.NotFound:
        """The answer for an unknown task, and for a private one the caller may not see: the
        same words, naming only the tasks the caller may see."""
        known = sorted(t.name for t in self.store.list_tasks() if self.visible(t))
        return E.NotFound(f"unknown task {name!r}; known tasks: {known}")

    def _get_task(self, name: str) -> TaskRecord:
        """The task record, if the caller may see it.

        Raises:
          NotFound: unknown, or private and not visible to the caller (:meth:`_unknown`).
        """
        from mu2net.store import TaskNotFound

        try:
            record = self.store.get_task(name)
        except TaskNotFound:
            raise self._unknown(name) from None
        except Exception as e:
            raise E.to_service_error(e) or e
        if not self.visible(record):
            raise self._unknown(name)
        return record

    def _check_visible(self, task: TaskRecord) -> None:
        if not self.visible(task):
            raise self._unknown(task.name)

    # ---- classify -----------------------------------------------------------------------

    def served(self, task: str, snapshot: Snapshot | None = None) -> ServedPath:
        """The task's served path in ``snapshot`` (read once by the caller).

        Raises:
          NotFound: unknown task, or a private one the caller may not see.
          NotReady: the task has no served path yet.
        """
        snap = snapshot or self.manager.snapshot
        sp = snap.paths.get(task)
        if sp is not None:
            self._check_visible(sp.task)
            return sp
        record = self._get_task(task)
        raise E.NotReady(f"task {task!r} is {record.state} and has no served path yet; retry when it is serving")

    async def classify(self, task: str, *, encoded: Sequence[bytes] = (), raw: np.ndarray | None = None,
                       top_k: int = 1, clip_top_k: bool = False, timeout: float | None = None) -> ClassifyResult:
        """Classifies images with the task's served path.

        ``clip_top_k`` caps ``top_k`` at the served path's class count (the Open Inference
        Protocol's classification extension) instead of rejecting a larger value.

        ``timeout`` (seconds left of the request's deadline: the gRPC deadline, the Open
        Inference Protocol's ``timeout`` parameter or HTTP ``timeout_ms``, the shortest of those
        given) drops images not computed by then.

        Raises:
          NotFound, NotReady, InvalidArgument, Overloaded, DeadlineExceeded (see
          :mod:`server.errors`).
        """
        started = time.monotonic()  # the deadline counts from here, decoding included
        snapshot = self.manager.snapshot  # one snapshot read: the request finishes on this version
        served = self.served(task, snapshot)
        n_classes = served.path.architecture.num_classes
        if top_k == 0:
            top_k = 1
        if clip_top_k:
            top_k = min(top_k, n_classes)
        if not 1 <= top_k <= n_classes:
            raise E.InvalidArgument(f"top_k={top_k}; allowed: 1..{n_classes} for task {task!r}")
        if bool(encoded) == (raw is not None):
            raise E.InvalidArgument("give either encoded images or one raw uint8 tensor (exactly one of them)")
        count = len(encoded) if encoded else (len(raw) if raw is not None else 0)
        if count > MAX_IMAGES_PER_REQUEST:
            raise E.InvalidArgument(f"{count} images in one request; at most {MAX_IMAGES_PER_REQUEST}")
        if timeout is not None and timeout <= 0:
            raise E.DeadlineExceeded("the request's deadline passed before its images were decoded (while the "
                                     "request was received); they were not run")
        if encoded:
            images = await asyncio.to_thread(decode_images, list(encoded), served.task.image_shape)
        else:
            images = check_raw(np.asarray(raw))
            if images.shape[1:] != tuple(served.task.image_shape):
                images = await asyncio.to_thread(conform_raw, images, served.task.image_shape)
        left = None if timeout is None else timeout - (time.monotonic() - started)
        if left is not None and left <= 0:
            raise E.DeadlineExceeded("the request's deadline passed while its images were decoded; they were not run")
        probs = await self.batcher.predict(served, images, timeout=left, snapshot_version=snapshot.version)
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k].astype(np.int32)
        scores = np.take_along_axis(probs, order, axis=-1)
        names = served.task.label_names
        return ClassifyResult(label_ids=order, scores=scores, labels=[[names[i] for i in row] for row in order.tolist()],
                              probabilities=probs, system_version=served.version, path_id=served.path.id)

    # ---- tasks --------------------------------------------------------------------------

    def task_view(self, name: str, snapshot: Snapshot | None = None) -> dict[str, Any]:
        """The task resource (state queued | training | serving | failed).

        Besides the served path's metrics it carries ``improved_at`` (unix seconds of the
        last publish of a new best path, or None), ``history`` (every such publish, oldest
        first: system version, unix time, validation and test accuracy in [0, 1]),
        ``evolution`` (``paused``, ``stale_iterations``) and ``evolver`` (the evolver's
        status while it trains this task, else None).

        Raises:
          NotFound: for an unknown task.
        """
        t = self._get_task(name)
        try:
            history = self.store.history(name)
            evolver = self.store.evolver_status()
        except Exception as e:
            raise E.to_service_error(e) or e
        return self._view(t, snapshot or self.manager.snapshot, history, evolver)

    def list_tasks(self) -> list[dict[str, Any]]:
        """Every task resource in queue order (the store's history and evolver status read once)."""
        snap = self.manager.snapshot
        records = [t for t in self.store.list_tasks() if self.visible(t)]
        by_task: dict[str, list[dict[str, Any]]] = {}
        for h in self.store.history():
            by_task.setdefault(h["task"], []).append(h)
        evolver = self.store.evolver_status()
        return [self._view(t, snap, by_task.get(t.name, []), evolver) for t in records]

    @staticmethod
    def _view(t: TaskRecord, snap: Snapshot, history: list[dict[str, Any]], evolver: dict[str, Any]) -> dict[str, Any]:
        sp = snap.paths.get(t.name)
        state = "serving" if sp is not None else ("training" if t.state == "serving" else t.state)
        view: dict[str, Any] = {
            "name": t.name, "state": state, "private": t.private, "acl_group": t.acl_group,
            "labels": list(t.label_names), "image_shape": list(t.image_shape), "num_examples": dict(t.num_examples),
            "splits": dict(t.splits), "iterations_done": t.iterations_done, "error": t.error,
            "system_version": sp.version if sp else 0, "path_id": sp.path.id if sp else None, "metrics": {},
            "improved_at": t.improved_at,
            "history": [{k: h[k] for k in HISTORY_KEYS} for h in history],
            "evolution": {"paused": t.paused_version is not None, "stale_iterations": t.stale_iterations,
                          "pinned": t.pinned},
            "evolver": dict(evolver) if evolver.get("state") == "training" and evolver.get("task") == t.name
            else None,
        }
        if sp is not None:
            m = sp.path.metrics
            view["metrics"] = {k: m[k] for k in ("validation_accuracy", "test_accuracy", "activated_params",
                                                 "trainable_params") if k in m}
            view["metrics"]["score"] = sp.path.score
            view["path_length"] = len(sp.path.component_ids)
        return view

    def evolve(self, name: str) -> dict[str, Any]:
        """Asks the evolver to run a task again (clears a pause of continual evolution).

        Raises:
          NotFound: for an unknown task.
        """
        try:
            self.store.wake_task(name)
        except Exception as e:
            raise E.to_service_error(e) or e
        return self.task_view(name)

    def rollback(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Rolls a task back to its path at an earlier system version retained in the model
        repository and pins it there (``POST /v1/tasks/{name}/rollback``; TF Serving's
        version pinning): the evolver neither runs the task nor replaces that path until
        :meth:`evolve` wakes it.

        Args:
          name: the task.
          version: a retained system version (``GET /v1/system``'s ``repository``); None:
            the newest retained one whose path for the task differs from the served one.

        Returns:
          The task resource, with ``rolled_back_to`` (``system_version``, ``path_id``).

        Raises:
          NotFound: an unknown task (or deleted during the rollback), a version not
            retained (or collected meanwhile), or no retained version with another path of it.
          FailedPrecondition: the server exports to no repository, the path used
            components trained on a task deleted since (their removal is never undone),
            or, without ``version``, the task is already pinned (a retried rollback does
            not roll it forward again).
          Aborted: the served path changed (a concurrent rollback or publish) between the
            choice and its commit; nothing restored (HTTP 409, gRPC ABORTED).
          RepositoryUnavailable: the repository could not be read, or what it holds is
            malformed or does not match its digests (HTTP 503).
        """
        from mu2net.repository import ManifestGone, RepositoryError
        from mu2net.store import ComponentsGone, ServedPathChanged, StoreError

        poller = self.repository
        if poller is None or self.config.replica:
            raise E.FailedPrecondition("rolling back needs the model repository's retained versions: start the "
                                       "evolver host's server with --repository URL (it keeps --keep-versions of "
                                       "them)")
        task = self._get_task(name)
        if version is None and task.pinned:  # a retried rollback must not roll the task forward again
            raise E.FailedPrecondition(f"task {name!r} is already rolled back and pinned to its served path; give "
                                       f"?version=V for another retained version, or wake it (POST "
                                       f"/v1/tasks/{name}/evolve) first")
        served = self.store.best_path(name)
        repo = poller.repository

        def deleted_meanwhile() -> bool:  # (and maybe uploaded again under its name)
            now = next((t for t in self.store.list_tasks() if t.name == name), None)
            return now is None or now.seq != task.seq

        try:
            revisions = repo.retained()  # one listing for the whole rollback
            retained = sorted(revisions)
            if version is not None and version not in retained:
                raise E.NotFound(f"system version {version} is not retained in the model repository; retained: "
                                 f"{retained} (--keep-versions sets how many)")
            live_tasks = {(t.name, t.seq) for t in self.store.list_tasks()}
            for v in reversed(retained if version is None else [version]):
                manifest = repo.manifest(v, revisions[v])
                if not {(t["name"], t["seq"]) for t in manifest["tasks"]} <= live_tasks:
                    # it holds a task deleted since (maybe uploaded again under its name): its
                    # components may carry that task's knowledge (Section 3.4), as collect rules
                    if version is not None:
                        raise E.FailedPrecondition(f"task {name!r} cannot go back to system version {v}: it "
                                                   f"holds a task deleted since (paper Section 3.4)")
                    continue
                seq = next((t["seq"] for t in manifest["tasks"] if t["name"] == name), None)
                row = next((p for p in manifest["paths"] if p["task"] == name), None)
                if seq != task.seq or row is None or (version is None and served is not None
                                                      and row["id"] == served.id):
                    continue  # another task of the same name then, not served then, or the served path
                try:
                    # the served path and the pin it was chosen from are checked again in the
                    # publish's transaction: of two concurrent rollbacks one goes back one step
                    self.store.restore_path(row, manifest["components"], repo.read_array, task_seq=task.seq,
                                            expect_served=served.id if served is not None else None,
                                            refuse_pinned=version is None)
                except ComponentsGone as e:
                    raise E.FailedPrecondition(f"task {name!r} cannot go back to system version {v}: {e}") from None
                except ServedPathChanged as e:
                    raise E.Aborted(f"{e}; read the task and retry") from None
                self.manager.refresh()  # the answer shows the path served now
                view = self.task_view(name)
                view["rolled_back_to"] = {"system_version": v, "path_id": row["id"]}
                return view
        except (RepositoryError, StoreError, OSError) as e:
            if deleted_meanwhile():
                raise E.NotFound(f"task {name!r} was deleted during the rollback; nothing restored") from None
            if isinstance(e, ManifestGone):  # collected between the listing and the read
                raise E.NotFound(f"task {name!r} was not rolled back: {e}") from None
            if isinstance(e, StoreError):
                raise E.to_service_error(e) or E.RepositoryUnavailable(
                    f"task {name!r} was not rolled back: {e}") from None
            raise E.RepositoryUnavailable(f"task {name!r} was not rolled back (model repository {repo.url}, "
                                          f"store {self.store.data_dir}): {type(e).__name__}: {e}") from None
        raise E.NotFound(f"task {name!r} has no other path in the retained system versions {retained}"
                         if version is None else f"task {name!r} had no path at system version {version}")

    def upload_file(self, name: str, body_path: str, private: bool, acl_group: str | None) -> dict[str, Any]:
        """Validates and stores an uploaded dataset (blocking; run in a thread).

        Raises:
          InvalidArgument: bad name or rejected dataset; AlreadyExists.
        """
        with self._ingesting_lock:
            self._ingesting += 1
        try:
            D.validate_task_name(name)
            if any(t.name == name for t in self.store.list_tasks()):
                raise E.AlreadyExists(f"task {name!r} already exists; delete it first or choose another name")
            splits, names = A.load_dataset_file(body_path, self.config.max_archive_bytes)
            add_task_arrays(self.store, name, splits, names, source="upload", private=private, acl_group=acl_group)
        except Exception as e:
            raise E.to_service_error(e) or e
        finally:
            with self._ingesting_lock:
                self._ingesting -= 1
        return self.task_view(name)

    @property
    def ingesting(self) -> int:
        """Uploads being validated and stored at this moment (on :attr:`ingest_pool`)."""
        return self._ingesting

    def delete_task(self, name: str) -> dict[str, Any]:
        try:
            requeued = self.store.delete_task(name)
        except Exception as e:
            raise E.to_service_error(e) or e
        return {"deleted": name, "requeued": requeued}

    def check_admin(self, token: str | None) -> None:
        """Raises Unauthenticated unless ``token`` is the admin token (constant-time comparison)."""
        expected = self.config.admin_token
        if expected is not None and not _token_matches(token, expected):
            raise E.Unauthenticated("this call needs the server's admin bearer token (Authorization: Bearer ...)")

    # ---- system -------------------------------------------------------------------------

    def system(self) -> dict[str, Any]:
        """Parameter totals, activated parameters per task, the layer pool graph and the evolver status."""
        comps = {c.id: c for c in self.store.list_components()}
        snap = self.manager.snapshot
        tasks: dict[str, dict[str, Any]] = {}
        usage: dict[str, list[str]] = {}
        for name, sp in snap.paths.items():
            if not self.visible(sp.task):
                continue
            ids = [c for c in sp.path.component_ids if c in comps]
            tasks[name] = {"path_id": sp.path.id, "components": ids,
                           "activated_params": sum(comps[c].num_params for c in ids), "version": sp.version}
            for c in ids:
                usage.setdefault(c, []).append(name)
        sharing = {a: {b: len(set(tasks[a]["components"]) & set(tasks[b]["components"])) for b in tasks if b != a}
                   for a in tasks}
        hidden = {t.name for t in self.store.list_tasks() if not self.visible(t)}
        return {
            "system_version": snap.version, "store_version": self.store.system_version(),
            "total_params": sum(c.num_params for c in comps.values()),
            "loaded_unique_params": self.manager.unique_params(),
            "loaded_param_bytes": self.manager.param_bytes(),
            "live_array_bytes": int(sum(a.nbytes for a in jax.live_arrays())),  # type: ignore[no-untyped-call]
            "tasks": tasks, "sharing": sharing,
            "components": [{"id": c.id, "kind": c.kind, "task": None if c.task in hidden else c.task,
                            "num_params": c.num_params,
                            "private": c.acl_group is not None, "parent_id": c.parent_id,
                            "used_by": usage.get(c.id, [])} for c in comps.values()],
            "last_load_error": (None if self.manager.last_error is None else "a task the caller may not see failed "
                                "to load" if any(repr(h) in self.manager.last_error or f"task {h}:" in
                                                 self.manager.last_error for h in hidden)
                                else self.manager.last_error),
            "evolver": self._evolver_status(hidden),
            "repository": self._repository_status(),
        }

    def _repository_status(self) -> dict[str, Any] | None:
        """The model repository this server exports to (``role`` primary) or mirrors
        (replica): its URL, the version it last wrote or mirrored, and the last error."""
        poller = self.repository
        if poller is None:
            return None
        return {"url": poller.url, "role": "replica" if self.config.replica else "primary",
                "last_version": poller.last_version, "last_error": poller.last_error}

    def _evolver_status(self, hidden: set[str]) -> dict[str, Any]:
        """The evolver's status; while it works on a task the caller may not see, only its
        state and time (no task name, iteration or counts)."""
        status = self.store.evolver_status()
        if status.get("task") in hidden:
            return {"state": status.get("state"), "task": None, "phase": "private task",
                    "updated": status.get("updated")}
        return status

    @contextlib.contextmanager
    def request_slot(self, method: str) -> Iterator[None]:
        """Holds one of the ``max_concurrent_requests`` slots while a request of ``method``
        (a handler's name) is handled; methods in :data:`UNBOUNDED_METHODS` hold none.

        Raises:
          Overloaded: every slot is taken (429 / RESOURCE_EXHAUSTED with a retry hint).
        """
        limit = self.config.max_concurrent_requests
        if limit is None or method in UNBOUNDED_METHODS:
            yield
            return
        with self._requests_lock:
            if self._requests >= limit:
                raise E.Overloaded(f"{self._requests} requests are in progress, the most this server handles at "
                                   f"once (--max-concurrent-requests); retry in {E.Overloaded.retry_after} s")
            self._requests += 1
        try:
            yield
        finally:
            with self._requests_lock:
                self._requests -= 1

    @contextlib.contextmanager
    def upload_slot(self) -> Iterator[None]:
        """Holds one of the ``max_concurrent_uploads`` slots while the block runs.

        Raises:
          Overloaded: every slot is taken (429 with a retry hint).
        """
        if not self.upload_slots.acquire(blocking=False):
            raise E.Overloaded(f"{self.config.max_concurrent_uploads} uploads are in progress, the most this server "
                               f"takes at once; retry in {E.Overloaded.retry_after} s")
        try:
            yield
        finally:
            self.upload_slots.release()

    def close(self) -> None:
        self.ingest_pool.shutdown(wait=False, cancel_futures=True)
        self.batcher.close()
        self.manager.stop()




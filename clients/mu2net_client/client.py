"""Synchronous and asynchronous clients: classify over gRPC, manage tasks over HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
import zipfile
from typing import Any, AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, TypeVar

import grpc
import httpx
import numpy as np
import tenacity

from mu2net_client import errors as E
from mu2net_client._proto import mu2net_pb2 as pb
from mu2net_client._proto import mu2net_pb2_grpc as pbgrpc
from mu2net_client.types import Classification, ClassifyResult, Task

T = TypeVar("T")
Images = Any  # np.ndarray [N,H,W,C] / [H,W,C] / [N,H,W] uint8, PIL image(s), bytes, or a list of those
DatasetLike = Any  # directory, archive or .npz path; or a mapping of numpy arrays (x_train, y_train, ...)

DEFAULT_GRPC = "127.0.0.1:50051"
DEFAULT_HTTP = "http://127.0.0.1:8000"


def _encode_png(image: Any) -> bytes:
    from PIL import Image

    if isinstance(image, np.ndarray):
        arr = image.astype(np.uint8)
        image = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def classify_request(task: str, images: Images, top_k: int) -> pb.ClassifyRequest:
    """Builds the gRPC request: numpy batches go raw, everything else encoded.

    Raises:
      InvalidArgumentError: for an unsupported image type or array shape.
    """
    if isinstance(images, np.ndarray):
        arr = images
        if arr.dtype != np.uint8:
            raise E.InvalidArgumentError(f"numpy images must be uint8, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
            arr = arr[None]
        elif arr.ndim == 3:
            arr = arr[..., None]
        elif arr.ndim == 2:
            arr = arr[None, ..., None]
        if arr.ndim != 4:
            raise E.InvalidArgumentError(f"numpy images have shape {images.shape}; allowed: [N,H,W,C], [H,W,C], "
                                         "[N,H,W] or [H,W]")
        return pb.ClassifyRequest(task=task, raw=pb.RawTensor(shape=list(arr.shape), data=np.ascontiguousarray(arr).tobytes()),
                                  top_k=top_k)
    items = images if isinstance(images, (list, tuple)) else [images]
    encoded = []
    for i, item in enumerate(items):
        if isinstance(item, (bytes, bytearray)):
            encoded.append(bytes(item))
        elif isinstance(item, np.ndarray) or hasattr(item, "save"):
            encoded.append(_encode_png(item))
        else:
            raise E.InvalidArgumentError(f"image {i} has type {type(item).__name__}; allowed: numpy uint8 array, "
                                         "PIL image or encoded bytes")
    return pb.ClassifyRequest(task=task, encoded_images=encoded, top_k=top_k)


def classify_result(resp: pb.ClassifyResponse) -> ClassifyResult:
    return ClassifyResult(
        results=tuple(Classification(tuple(r.labels), tuple(r.label_ids), tuple(r.scores)) for r in resp.results),
        system_version=resp.system_version, path_id=resp.path_id)


def _stream_request(index: int, task: str, images: Images, top_k: int) -> pb.ClassifyRequest:
    req = classify_request(task, images, top_k)
    req.id = str(index)
    return req


def stream_answer(answer: pb.ClassifyStreamResponse) -> tuple[int, ClassifyResult | E.Mu2netError]:
    """One ClassifyStream answer as (index of its request, result or the SDK error it
    would have raised from :meth:`Client.classify`).

    Raises:
      ServerError: for an answer whose id is not one the SDK sent (a request index).
    """
    try:
        index = int(answer.id)
    except ValueError:
        raise E.ServerError(f"ClassifyStream answered an unknown request id {answer.id!r}") from None
    if answer.error_code:
        code = getattr(grpc.StatusCode, answer.error_code, grpc.StatusCode.UNKNOWN)
        return index, E.from_status(code, answer.error_message, answer.error_type or None,
                                    answer.retry_after_ms or None)
    return index, classify_result(answer.response)


def dataset_body(data: DatasetLike) -> tuple[Any, str]:
    """Request body of an upload and a description: an open file, or bytes.

    Directories are zipped (ImageFolder layout kept); mappings of arrays become an npz.
    """
    if isinstance(data, Mapping):
        buf = io.BytesIO()
        arrays: dict[str, Any] = {str(k): np.asarray(v) for k, v in data.items()}
        np.savez(buf, **arrays)
        return buf.getvalue(), "arrays"
    path = os.fspath(data)
    if os.path.isdir(path):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for root, _, files in os.walk(path):
                for f in sorted(files):
                    full = os.path.join(root, f)
                    zf.write(full, os.path.relpath(full, path))
        return buf.getvalue(), f"directory {path}"
    if not os.path.isfile(path):
        raise E.InvalidArgumentError(f"dataset {path!r} is not a directory, archive or .npz file")
    return open(path, "rb"), f"file {path}"


def channel_options(max_message_bytes: int, retries: int) -> list[tuple[str, Any]]:
    """gRPC channel options: message limits, and gRPC's own retry policy (service config) for
    the idempotent calls (Classify, ListTasks, GetTask): up to ``retries`` retries, at most 4
    (gRPC caps attempts at 5), with exponential backoff from 0.2 s, on UNAVAILABLE (the server
    unreachable) and RESOURCE_EXHAUSTED (overloaded). The server's ``grpc-retry-pushback-ms``
    sets the delay, and a negative pushback (a task not ready, a message too large) stops the
    retries; the call's timeout covers every attempt."""
    opts: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes),
                                   ("grpc.max_send_message_length", max_message_bytes)]
    if retries > 0:
        config = {"methodConfig": [{
            "name": [{"service": "mu2net.v1.Mu2Net", "method": m} for m in ("Classify", "ListTasks", "GetTask")],
            "retryPolicy": {"maxAttempts": min(retries, 4) + 1, "initialBackoff": "0.2s", "maxBackoff": "5s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]},
        }]}
        opts += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
    return opts


#: Longest wait honoured from a server's Retry-After (seconds); a longer hint is cut to this.
MAX_RETRY_AFTER = 30.0


def _wait_retry_after(state: tenacity.RetryCallState) -> float:
    """Seconds before the next attempt after an OverloadedError: the server's Retry-After
    (HTTP) / ``grpc-retry-pushback-ms`` hint, at most :data:`MAX_RETRY_AFTER`; without a hint
    exponential back-off, 0.5 s doubling to 8 s."""
    error = state.outcome.exception() if state.outcome is not None else None
    hint = getattr(error, "retry_after", None)
    if hint is not None:
        return float(min(max(0.0, hint), MAX_RETRY_AFTER))
    return float(min(8.0, 0.5 * 2 ** (state.attempt_number - 1)))


def overload_retry(retries: int) -> dict[str, Any]:
    """tenacity arguments that retry a call refused with 429 / RESOURCE_EXHAUSTED
    (:class:`~mu2net_client.errors.OverloadedError`) up to ``retries`` times, waiting as the
    server asks (:func:`_wait_retry_after`); the last refusal is re-raised. Only for calls the
    server refused before doing anything (overload), so a retry cannot apply one twice."""
    return dict(retry=tenacity.retry_if_exception_type(E.OverloadedError), wait=_wait_retry_after,
                stop=tenacity.stop_after_attempt(max(0, retries) + 1), reraise=True)


def _rewind(body: Any) -> Any:
    """The upload body ready to be sent (again): a file is rewound to its start."""
    if hasattr(body, "seek"):
        body.seek(0)
    return body


def _channel_credentials(ca: str | None, client: tuple[str, str] | None) -> grpc.ChannelCredentials | None:
    """gRPC TLS credentials from PEM files (None: plaintext)."""
    if ca is None and client is None:
        return None
    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()
    cert, key = client if client is not None else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))


def _http_tls(ca: str | None, client: tuple[str, str] | None) -> dict[str, Any]:
    """httpx transport TLS options from PEM files (an SSL context verifying against ``ca``)."""
    if ca is None and client is None:
        return {}
    import ssl

    context = ssl.create_default_context(cafile=ca)
    if client is not None:
        context.load_cert_chain(*client)
    return {"verify": context}


def _check_serving(t: Task, deadline: float | None, timeout: float | None) -> bool:
    """True when ``t`` serves; raises when it failed or the deadline passed."""
    if t.state == "serving":
        return True
    if t.state == "failed":
        raise E.ServerError(f"task {t.name!r} failed: {t.error}")
    if deadline is not None and time.monotonic() > deadline:
        raise E.TimeoutError(f"task {t.name!r} still {t.state} after {timeout}s")
    return False


#: Metrics :meth:`Client.wait_until` can wait for.
ACCURACY_METRICS = ("test_accuracy", "validation_accuracy")


def _check_target(accuracy: float, metric: str) -> None:
    if metric not in ACCURACY_METRICS:
        raise E.InvalidArgumentError(f"metric={metric!r}; allowed: {', '.join(map(repr, ACCURACY_METRICS))}")
    if not 0.0 <= accuracy <= 1.0:
        raise E.InvalidArgumentError(f"accuracy={accuracy}; allowed: a fraction in [0, 1]")


def _check_accuracy(t: Task, accuracy: float, metric: str, deadline: float | None, timeout: float | None) -> bool:
    """True when ``t``'s served path reaches ``accuracy``; raises when it failed or the deadline passed."""
    if t.state == "failed":
        raise E.ServerError(f"task {t.name!r} failed: {t.error}")
    value = t.metrics.get(metric)
    if value is not None and value >= accuracy:
        return True
    if deadline is not None and time.monotonic() > deadline:
        raise E.TimeoutError(f"task {t.name!r} ({t.state}) has {metric} {_fmt(value)} after {timeout}s; "
                             f"target {accuracy}")
    return False


def _fmt(value: float | None) -> str:
    return "none yet" if value is None else f"{value:.4f}"


def _accuracy_progress(t: Task, accuracy: float, metric: str) -> str:
    return (f"{t.name}: {t.state}, {metric} {_fmt(t.metrics.get(metric))} / {accuracy}, "
            f"system version {t.system_version}")


def _pause(poll: float, deadline: float | None) -> float:
    """Seconds to sleep before the next poll: ``poll``, cut short at the deadline."""
    return poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))


def _json(r: httpx.Response) -> dict[str, Any]:
    """The JSON body of a successful response; the mapped SDK error otherwise."""
    if r.status_code >= 400:
        raise E.from_http(r)
    doc: dict[str, Any] = r.json()
    return doc


def _upload_timeout(client_timeout: float, timeout: float | None) -> float:
    """An upload's httpx timeout: the call's, else the client's but at least 600 s."""
    return max(client_timeout, 600.0) if timeout is None else timeout


#: Seconds the waits (:meth:`Client.wait_until_serving`, :meth:`Client.wait_until`) treat an
#: unknown task as not visible yet: behind a load balancer, the replica that answers may
#: mirror a task uploaded through another server up to a second or two later.
UNKNOWN_GRACE_SECONDS = 10.0


def _unknown_for_good(started: float, deadline: float | None) -> bool:
    """Whether a wait that began at ``started`` (monotonic seconds) stops treating an unknown
    task as not mirrored yet: after :data:`UNKNOWN_GRACE_SECONDS` or at its deadline."""
    now = time.monotonic()
    return now - started > UNKNOWN_GRACE_SECONDS or (deadline is not None and now >= deadline)


def _upload_params(name: str, private: bool, acl_group: str | None) -> dict[str, str]:
    params = {"name": name, "private": str(private).lower()}
    if acl_group:
        params["acl_group"] = acl_group
    return params


def _rollback_params(version: int | None) -> dict[str, str]:
    """Query parameters of ``POST /v1/tasks/{name}/rollback``."""
    if version is None:
        return {}
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise E.InvalidArgumentError(f"version={version!r}; allowed: a system version (an integer >= 0) or None")
    return {"version": str(version)}


class Client:
    """Synchronous client.

    Args:
      grpc_target: ``host:port`` of the gRPC server.
      http_url: base URL of the HTTP server.
      token: bearer token sent with every call (HTTP ``Authorization``, gRPC ``authorization``
        metadata): the server's admin token (upload, delete, and every private task), or an
        ACL group's read token (``mu2net serve --read-token``: that group's private tasks).
      timeout: per-call timeout in seconds.
      retries: retries of idempotent calls: gRPC Classify/ListTasks/GetTask by gRPC's retry
        policy (see :func:`channel_options`), HTTP requests on connection failures by
        httpx's transport; an overloaded server's 429 / RESOURCE_EXHAUSTED (nothing done) by
        waiting its Retry-After (:func:`overload_retry`; also uploads). After the last
        retry, OverloadedError with the server's ``retry_after``.
      max_message_bytes: gRPC message size limit (match the server's).
      tls_ca: PEM file of the CA that signed a TLS server's certificate (``mu2net serve
        --tls-cert``): gRPC over TLS, and HTTPS verified against it (give an ``https://``
        ``http_url``). None: plaintext gRPC.
      tls_client_cert: (certificate PEM, key PEM) files presented to a server that requires
        client certificates (``--tls-client-ca``).
    """

    def __init__(self, grpc_target: str = DEFAULT_GRPC, http_url: str = DEFAULT_HTTP, *, token: str | None = None,
                 timeout: float = 30.0, retries: int = 3, max_message_bytes: int = 64 << 20,
                 tls_ca: str | None = None, tls_client_cert: tuple[str, str] | None = None) -> None:
        self.timeout, self.retries = timeout, retries
        options = channel_options(max_message_bytes, retries)
        credentials = _channel_credentials(tls_ca, tls_client_cert)
        self._channel = grpc.insecure_channel(grpc_target, options=options) if credentials is None else \
            grpc.secure_channel(grpc_target, credentials, options=options)
        self._stub = pbgrpc.Mu2NetStub(self._channel)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None  # gRPC calls
        # connection failures of HTTP calls are retried by httpx's transport (``retries``)
        self._http = httpx.Client(base_url=http_url, timeout=timeout, headers=headers,
                                  transport=httpx.HTTPTransport(retries=retries, **_http_tls(tls_ca, tls_client_cert)))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()
        self._http.close()

    def _get(self, url: str) -> Any:
        for attempt in tenacity.Retrying(**overload_retry(self.retries)):
            with attempt:
                with E.map_exceptions():
                    r = self._http.get(url)
                if r.status_code >= 400:
                    raise E.from_http(r)
        return r.json()

    # ---- classify (gRPC) ----------------------------------------------------------------

    def classify(self, task: str, images: Images, top_k: int = 1, *, timeout: float | None = None) -> ClassifyResult:
        """Top-k labels of each image with the task's served path.

        Args:
          timeout: seconds for this call, every retry included (default: the client's); sent
            as the gRPC deadline, so the server drops the images unrun once it passes, and
            refuses them at once if its queue would outlast it.

        Raises:
          NotFoundError, NotReadyError, InvalidArgumentError, TooLargeError, OverloadedError,
          TimeoutError, TransportError.
        """
        req = classify_request(task, images, top_k)
        with E.map_exceptions():
            return classify_result(self._stub.Classify(req, timeout=self.timeout if timeout is None else timeout,
                                                       metadata=self._metadata))

    def classify_stream(self, requests: Iterable[tuple[str, Images]], top_k: int = 1, *,
                        timeout: float | None = None) -> Iterator[tuple[int, ClassifyResult | E.Mu2netError]]:
        """Classifies many requests of any tasks over one ClassifyStream call: each
        ``(task, images)`` is served as :meth:`classify` would serve it, and answered as
        soon as it is done. Cheaper per request than one call each when requests are small
        (one image): the call's set-up and the per-call work happen once.

        Args:
          requests: (task name, images) pairs, read lazily as the call sends them.
          timeout: seconds for the whole call, its gRPC deadline (default: none, whatever
            the client's timeout: a stream may be fed for as long as the caller likes).

        Yields:
          (index of the request in ``requests``, its :class:`ClassifyResult`, or the error
          :meth:`classify` would have raised for it: NotFoundError, InvalidArgumentError,
          OverloadedError, ...), in completion order. A failed request does not end the stream.

        Raises:
          InvalidArgumentError: for images the SDK cannot send, after the answers to the
            requests before them (the stream ends there).
          TimeoutError, TransportError: if the call itself fails (not retried: answers may
            have arrived).

        Stopping early: closing the generator cancels the call (CPython closes it as soon as
        the last reference goes, e.g. after a ``break``; ``contextlib.closing`` says so
        explicitly, and ``contextlib.aclosing`` for the async client's, which only closes at once
        that way).
        """
        failed: list[Exception] = []  # gRPC reads the requests in a thread of its own

        def messages() -> Iterator[pb.ClassifyRequest]:
            try:
                for i, (task, images) in enumerate(requests):
                    yield _stream_request(i, task, images, top_k)
            except Exception as e:  # the stream ends here; raised after the answers to what was sent
                failed.append(e)

        with E.map_exceptions():
            call = self._stub.ClassifyStream(messages(), timeout=timeout, metadata=self._metadata)
            try:
                for answer in call:
                    yield stream_answer(answer)
            finally:
                call.cancel()  # the caller stopped early: the server stops too (no-op once done)
        if failed:
            raise failed[0]

    # ---- tasks (HTTP) -------------------------------------------------------------------

    def tasks(self) -> list[Task]:
        return [Task.from_json(t) for t in self._get("/v1/tasks")["tasks"]]

    def task(self, name: str) -> Task:
        return Task.from_json(self._get(f"/v1/tasks/{name}"))

    def system(self) -> dict[str, Any]:
        doc: dict[str, Any] = self._get("/v1/system")
        return doc

    def upload(self, name: str, data: DatasetLike, *, private: bool = False, acl_group: str | None = None,
               timeout: float | None = None) -> Task:
        """Uploads a labeled dataset as a new task.

        Not retried on a transport failure (the server may have created the task); a 429 (every
        upload slot of the server is taken: nothing was stored) is retried up to ``retries``
        times after the server's Retry-After (:func:`overload_retry`).

        Args:
          name: task name.
          data: ImageFolder directory, zip/tar archive or .npz path, or a mapping of arrays
            ``x_train [N,H,W(,C)] uint8``, ``y_train [N] int`` (optionally ``x_val``, ``y_val``,
            ``x_test``, ``y_test``, ``label_names``).
          private: withhold its components from other tasks.
          acl_group: ACL group of a private task.
          timeout: seconds for each attempt's network phases (httpx's connect, read, write;
            default: the client's timeout, at least 600 s, as large datasets take minutes).
        """
        body, _ = dataset_body(data)
        params = _upload_params(name, private, acl_group)
        try:
            for attempt in tenacity.Retrying(**overload_retry(self.retries)):
                with attempt:
                    with E.map_exceptions():
                        r = self._http.post("/v1/tasks", params=params, content=_rewind(body),
                                            headers={"Content-Type": "application/octet-stream"},
                                            timeout=_upload_timeout(self.timeout, timeout))
                    view = _json(r)
        finally:
            if hasattr(body, "close"):
                body.close()
        return Task.from_json(view)

    def delete(self, name: str) -> dict[str, Any]:
        with E.map_exceptions():
            r = self._http.delete(f"/v1/tasks/{name}")
        return _json(r)

    def evolve(self, name: str) -> Task:
        """Asks the evolver to run the task again: clears a pause of continual evolution
        (``POST /v1/tasks/{name}/evolve``; needs the admin token if the server has one).

        Raises:
          NotFoundError: for an unknown task.
          AuthenticationError: without the server's admin token.
        """
        with E.map_exceptions():
            r = self._http.post(f"/v1/tasks/{name}/evolve")
        return Task.from_json(_json(r))

    def rollback(self, name: str, version: int | None = None) -> Task:
        """Serves the task's path of an earlier system version again and pins it there: the
        evolver neither runs the task nor replaces that path until :meth:`evolve`
        (``POST /v1/tasks/{name}/rollback``; admin token; the evolver host's server must
        run with ``--repository``, whose retained versions it reads).

        Args:
          name: the task.
          version: a retained system version; None: the newest retained one whose path
            for the task differs from the served one.

        Raises:
          NotFoundError: an unknown task, or no retained version with another path of it.
          InvalidArgumentError: no model repository, or the path's components were deleted
            with a task since.
          NotReadyError: the server is shutting down, is a replica without ``--ingest-url``,
            or could not read the model repository whole.
          TransportError: a replica could not reach the evolver host's server (HTTP 502).
          ConflictError: the task's served path changed during the rollback (another
            rollback or a publish won, HTTP 409); nothing restored.
          TimeoutError: a replica got no answer from the evolver host in time (HTTP 504;
            the outcome is unknown: read the task).
          AuthenticationError: without the server's admin token.
        """
        with E.map_exceptions():
            r = self._http.post(f"/v1/tasks/{name}/rollback", params=_rollback_params(version))
        return Task.from_json(_json(r))

    def _poll(self, name: str, describe: Callable[[Task], str], reached: Callable[[Task, float | None], bool],
              timeout: float | None, poll: float, progress: bool) -> Task:
        """The waits' loop: polls the task every ``poll`` seconds, showing ``describe(task)``
        on a progress bar, until ``reached(task, deadline)`` (which raises on failure or at
        the deadline, ``timeout`` seconds from now or None); an unknown task counts as not
        mirrored yet for :data:`UNKNOWN_GRACE_SECONDS`."""
        from tqdm.auto import tqdm

        deadline = None if timeout is None else time.monotonic() + timeout
        with tqdm(desc=f"{name}: waiting", bar_format="{desc} [{elapsed}]", disable=not progress) as bar:
            started = time.monotonic()
            while True:
                try:
                    t = self.task(name)
                except E.NotFoundError:
                    if _unknown_for_good(started, deadline):
                        raise
                    time.sleep(_pause(poll, deadline))  # a replica has not mirrored the upload yet
                    continue
                bar.set_description_str(describe(t))
                if reached(t, deadline):
                    return t
                time.sleep(_pause(poll, deadline))
                bar.update(0)

    def wait_until_serving(self, name: str, timeout: float | None = None, poll: float = 1.0,
                           progress: bool = True) -> Task:
        """Polls until the task serves its first answer; shows its state with a progress bar.

        Args:
          name: task name.
          timeout: seconds to wait at most (None: no limit).
          poll: seconds between polls.
          progress: show a progress bar (tqdm, on stderr).

        Raises:
          TimeoutError: if it is not serving within ``timeout`` seconds.
          ServerError: if the task failed (the message says why).
          NotFoundError: if the task is still unknown after :data:`UNKNOWN_GRACE_SECONDS`.
        """
        return self._poll(name, lambda t: f"{name}: {t.state}, {t.iterations_done} iteration(s)",
                          lambda t, d: _check_serving(t, d, timeout), timeout, poll, progress)

    def wait_until(self, name: str, accuracy: float, *, metric: str = "test_accuracy", timeout: float | None = None,
                   poll: float = 1.0, progress: bool = True) -> Task:
        """Polls until the task's served path reaches an accuracy; shows a progress bar with
        the task's state, the metric's current value and the system version.

        Args:
          name: task name.
          accuracy: target, a fraction in [0, 1]; returns once ``metrics[metric] >= accuracy``.
          metric: ``"test_accuracy"`` or ``"validation_accuracy"``.
          timeout: seconds to wait at most (None: no limit; a target the task never
            reaches, e.g. while continual evolution has paused it, then waits forever).
          poll: seconds between polls.
          progress: show a progress bar (tqdm, on stderr).

        Returns:
          The task, serving a path that reaches ``accuracy``.

        Raises:
          InvalidArgumentError: for an unknown ``metric`` or ``accuracy`` outside [0, 1].
          TimeoutError: if the target is not reached within ``timeout`` seconds (the
            message gives the last value and the target).
          ServerError: if the task failed (the message says why).
        """
        _check_target(accuracy, metric)
        return self._poll(name, lambda t: _accuracy_progress(t, accuracy, metric),
                          lambda t, d: _check_accuracy(t, accuracy, metric, d, timeout), timeout, poll, progress)


class AsyncClient:
    """Asynchronous client (grpc.aio and httpx.AsyncClient); same API as :class:`Client`."""

    def __init__(self, grpc_target: str = DEFAULT_GRPC, http_url: str = DEFAULT_HTTP, *, token: str | None = None,
                 timeout: float = 30.0, retries: int = 3, max_message_bytes: int = 64 << 20,
                 tls_ca: str | None = None, tls_client_cert: tuple[str, str] | None = None) -> None:
        self.timeout, self.retries = timeout, retries
        options = channel_options(max_message_bytes, retries)
        credentials = _channel_credentials(tls_ca, tls_client_cert)
        self._channel = grpc.aio.insecure_channel(grpc_target, options=options) if credentials is None else \
            grpc.aio.secure_channel(grpc_target, credentials, options=options)
        self._stub = pbgrpc.Mu2NetStub(self._channel)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None  # gRPC calls
        self._http = httpx.AsyncClient(base_url=http_url, timeout=timeout, headers=headers,
                                       transport=httpx.AsyncHTTPTransport(retries=retries,
                                                                          **_http_tls(tls_ca, tls_client_cert)))

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()
        await self._http.aclose()

    async def classify(self, task: str, images: Images, top_k: int = 1, *,
                       timeout: float | None = None) -> ClassifyResult:
        """Async :meth:`Client.classify`."""
        req = classify_request(task, images, top_k)
        with E.map_exceptions():
            return classify_result(await self._stub.Classify(
                req, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata))

    async def classify_stream(self, requests: Iterable[tuple[str, Images]] | AsyncIterable[tuple[str, Images]],
                              top_k: int = 1, *, timeout: float | None = None
                              ) -> AsyncIterator[tuple[int, ClassifyResult | E.Mu2netError]]:
        """Async :meth:`Client.classify_stream` (``requests`` may be an async iterable)."""
        failed: list[Exception] = []

        async def messages() -> AsyncIterator[pb.ClassifyRequest]:
            try:
                if isinstance(requests, AsyncIterable):
                    i = 0
                    async for task, images in requests:
                        yield _stream_request(i, task, images, top_k)
                        i += 1
                else:
                    for i, (task, images) in enumerate(requests):
                        yield _stream_request(i, task, images, top_k)
            except Exception as e:  # the stream ends here; raised after the answers to what was sent
                failed.append(e)

        with E.map_exceptions():
            call = self._stub.ClassifyStream(messages(), timeout=timeout, metadata=self._metadata)
            try:
                async for answer in call:
                    yield stream_answer(answer)
            finally:
                call.cancel()
        if failed:
            raise failed[0]

    async def _get(self, url: str) -> Any:
        async for attempt in tenacity.AsyncRetrying(**overload_retry(self.retries)):
            with attempt:
                with E.map_exceptions():
                    r = await self._http.get(url)
                if r.status_code >= 400:
                    raise E.from_http(r)
        return r.json()

    async def tasks(self) -> list[Task]:
        return [Task.from_json(t) for t in (await self._get("/v1/tasks"))["tasks"]]

    async def task(self, name: str) -> Task:
        return Task.from_json(await self._get(f"/v1/tasks/{name}"))

    async def system(self) -> dict[str, Any]:
        doc: dict[str, Any] = await self._get("/v1/system")
        return doc

    async def upload(self, name: str, data: DatasetLike, *, private: bool = False,
                     acl_group: str | None = None, timeout: float | None = None) -> Task:
        """Async :meth:`Client.upload`."""
        body, _ = dataset_body(data)
        if hasattr(body, "read"):
            with body:
                body = body.read()
        params = _upload_params(name, private, acl_group)
        async for attempt in tenacity.AsyncRetrying(**overload_retry(self.retries)):
            with attempt:
                with E.map_exceptions():
                    r = await self._http.post("/v1/tasks", params=params, content=body,
                                              headers={"Content-Type": "application/octet-stream"},
                                              timeout=_upload_timeout(self.timeout, timeout))
                view = _json(r)
        return Task.from_json(view)

    async def delete(self, name: str) -> dict[str, Any]:
        with E.map_exceptions():
            r = await self._http.delete(f"/v1/tasks/{name}")
        return _json(r)

    async def evolve(self, name: str) -> Task:
        """Async :meth:`Client.evolve`."""
        with E.map_exceptions():
            r = await self._http.post(f"/v1/tasks/{name}/evolve")
        return Task.from_json(_json(r))

    async def rollback(self, name: str, version: int | None = None) -> Task:
        """Async :meth:`Client.rollback`."""
        with E.map_exceptions():
            r = await self._http.post(f"/v1/tasks/{name}/rollback", params=_rollback_params(version))
        return Task.from_json(_json(r))

    async def _poll(self, name: str, describe: Callable[[Task], str], reached: Callable[[Task, float | None], bool],
                    timeout: float | None, poll: float, progress: bool) -> Task:
        """Async :meth:`Client._poll`."""
        from tqdm.auto import tqdm

        deadline = None if timeout is None else time.monotonic() + timeout
        with tqdm(desc=f"{name}: waiting", bar_format="{desc} [{elapsed}]", disable=not progress) as bar:
            started = time.monotonic()
            while True:
                try:
                    t = await self.task(name)
                except E.NotFoundError:
                    if _unknown_for_good(started, deadline):
                        raise
                    await asyncio.sleep(_pause(poll, deadline))  # a replica has not mirrored the upload yet
                    continue
                bar.set_description_str(describe(t))
                if reached(t, deadline):
                    return t
                await asyncio.sleep(_pause(poll, deadline))
                bar.update(0)

    async def wait_until_serving(self, name: str, timeout: float | None = None, poll: float = 1.0,
                                 progress: bool = True) -> Task:
        """Async :meth:`Client.wait_until_serving`."""
        return await self._poll(name, lambda t: f"{name}: {t.state}, {t.iterations_done} iteration(s)",
                                lambda t, d: _check_serving(t, d, timeout), timeout, poll, progress)

    async def wait_until(self, name: str, accuracy: float, *, metric: str = "test_accuracy",
                         timeout: float | None = None, poll: float = 1.0, progress: bool = True) -> Task:
        """Async :meth:`Client.wait_until`."""
        _check_target(accuracy, metric)
        return await self._poll(name, lambda t: _accuracy_progress(t, accuracy, metric),
                                lambda t, d: _check_accuracy(t, accuracy, metric, d, timeout), timeout, poll, progress)


__all__ = ["Client", "AsyncClient", "classify_request", "dataset_body"]

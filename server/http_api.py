"""HTTP front end (starlette): the task API, the Open Inference Protocol REST API with the
binary tensor and classification extensions, Prometheus metrics and a status page."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import json
import logging
import math
import os
import tempfile
import time
import urllib.parse
import uuid
from typing import Any, Awaitable, Callable, TypeVar

import httpx
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mu2net.server import errors as E
from mu2net.server.oip import (EXTENSIONS, OUTPUT_NAME, SERVER_NAME, SERVER_VERSION, classification_strings,
                               infer_input, model_metadata, request_timeout, requested_classification,
                               serialize_bytes_tensor)
from mu2net.server.openapi import document as openapi_document
from mu2net.server.page import render_page
from mu2net.server.service import CALLER_TOKEN, Service, bearer_token, raw_images

HEADER_LENGTH = "Inference-Header-Content-Length"
#: Seconds a replica waits for the evolver host's answer to a forwarded write (an upload is
#: answered once ingested, which can take minutes for a large archive).
FORWARD_TIMEOUT_SECONDS = 600.0
#: Header a replica adds to a forwarded write; a replica refuses a request that carries it
#: (a replica forwarding to a replica would loop).
FORWARDED_HEADER = "mu2net-forwarded"
log = logging.getLogger("mu2net.server")
OPENAPI = openapi_document()


def _int_param(request: Request, name: str, default: int) -> int:
    """An integer query parameter; a clear 400 for anything else."""
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise E.InvalidArgument(f"query parameter {name}={text!r} is not an integer") from None


#: Handlers that take their :meth:`Service.request_slot` once the request body is read.
_SLOT_AFTER_BODY = frozenset({"classify", "v2_infer"})


def _timeout_param(request: Request) -> float | None:
    """The ``timeout_ms`` query parameter (milliseconds, a positive finite number) in seconds:
    the classify's deadline, counted from the handler's entry; images not computed by then
    are dropped unrun and the answer is 504. Absent: no deadline.

    Raises:
      InvalidArgument: anything but a positive finite number.
    """
    text = request.query_params.get("timeout_ms")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise E.InvalidArgument(f"query parameter timeout_ms={text!r}; allowed: a positive number of milliseconds")
    return value / 1e3


def _left(timeout: float | None, entered: float) -> float | None:
    """Seconds left of ``timeout`` counted from ``entered`` (time.monotonic()), or None."""
    return None if timeout is None else timeout - (time.monotonic() - entered)


def _content_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not (declared.strip().isascii() and declared.strip().isdigit()):
        raise E.InvalidArgument(f"Content-Length {declared!r} is not a non-negative integer")
    return int(declared)


def _error(err: E.ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if isinstance(err, E.Overloaded) else None
    code, status = E.codes(err)
    return JSONResponse({"error": str(err), "code": code.name}, status_code=status, headers=headers)


T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the ASGI ``http.disconnect`` message; the body
    must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.01)  # an empty body message: not a busy loop on any ASGI server


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits ``work``, cancelling it if the client disconnects first (a classify's queued
    images are then dropped unrun, as for a cancelled gRPC call).

    Raises:
      Cancelled: the client went away first.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and gone.exception() is not None:
            # the watcher failed (not a disconnect): say so, and wait for the work alone
            log.warning("HTTP disconnect watch failed: %r", gone.exception())
            await asyncio.wait({task})
    except BaseException:  # this handler cancelled (shutdown): the work goes too
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise E.Cancelled("the client disconnected before the answer; its images were not computed")
    return task.result()


def build_app(service: Service, upload_dir: str) -> Starlette:
    """The starlette application over ``service``; uploads are spooled in ``upload_dir``."""

    Handler = Callable[[Request], Awaitable[Response]]

    def endpoint(method_name: str) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            async def handler(request: Request) -> Response:
                t0 = time.perf_counter()
                done = service.metrics.observe("http", method_name) if service.metrics is not None else None
                CALLER_TOKEN.set(bearer_token(request.headers.get("authorization")))  # this request's task
                try:
                    if method_name in _SLOT_AFTER_BODY:  # takes its slot itself, once its body is read
                        resp = await fn(request)
                    else:
                        with service.request_slot(method_name):  # 429 when every slot is taken
                            resp = await fn(request)
                except asyncio.CancelledError:  # the server cancelled the handler (shutdown)
                    if done is not None:
                        done("499", time.perf_counter() - t0)
                    raise
                except Exception as e:
                    err = E.to_service_error(e)
                    if err is not None:
                        resp = _error(err)
                    else:  # a bug: logged with a request id; the client sees no internals
                        request_id = uuid.uuid4().hex
                        log.exception("HTTP %s %s failed (request id %s)", request.method, request.url.path,
                                      request_id)
                        resp = JSONResponse({"error": "internal server error", "request_id": request_id},
                                            status_code=500)
                if done is not None:
                    done(str(resp.status_code), time.perf_counter() - t0)
                return resp
            return handler
        return deco

    def admin(request: Request) -> None:
        service.check_admin(bearer_token(request.headers.get("authorization")))

    async def forward(request: Request) -> Response:
        """A replica's write (upload, delete, evolve, rollback) sent on as it came to the evolver host's
        server, whose answer (status, JSON body, Location, Retry-After) goes back as it is:
        the evolver host validates, stores and evolves it, and every replica serves the
        result once the model repository has its system version."""
        target = service.config.ingest_url
        if target is None:
            raise E.NotReady(f"{request.method} {request.url.path}: this server is a read-only replica of a model "
                             f"repository (started with --no-evolver --repository and without --ingest-url); send "
                             f"uploads, deletes, evolve and rollback requests to the evolver host's server")
        if FORWARDED_HEADER in request.headers:
            raise E.BadGateway(f"{request.method} {request.url.path} was forwarded to this replica by another "
                               f"server: --ingest-url must name the evolver host's server, not a replica")
        # the path as it arrived (percent-encoded): a decoded '?' or '#' in a name must stay in the name
        raw = request.scope.get("raw_path")
        path = raw.decode("latin-1") if isinstance(raw, bytes) else urllib.parse.quote(request.url.path)
        url = target.rstrip("/") + path + (f"?{request.url.query}" if request.url.query else "")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type", "content-length")}
        headers[FORWARDED_HEADER] = "1"
        body = request.stream() if request.method == "POST" else None
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(FORWARD_TIMEOUT_SECONDS, connect=10.0)) as client:
                resp = await client.request(request.method, url, headers=headers, content=body)
        except httpx.TimeoutException as e:  # it may still complete there: not "never arrived"
            raise E.DeadlineExceeded(f"the evolver host's server {target} did not answer {request.method} "
                                     f"{request.url.path} in time ({type(e).__name__}); it may still complete "
                                     f"it: check GET /v1/tasks before sending it again") from None
        except httpx.HTTPError as e:
            raise E.BadGateway(f"the evolver host's server {target} did not answer {request.method} "
                               f"{request.url.path}: {type(e).__name__}: {e}") from None
        kept = {k: resp.headers[k] for k in ("content-type", "location", "retry-after") if k in resp.headers}
        return Response(resp.content, status_code=resp.status_code, headers=kept)

    @endpoint("upload")
    async def upload(request: Request) -> Response:
        if service.config.replica:
            if service.config.admin_token:  # no slot held, no body streamed on, for a caller without the token
                admin(request)
            with service.upload_slot():  # 429 when max_concurrent_uploads are in progress
                return await forward(request)
        admin(request)
        name = request.query_params.get("name")
        if not name:
            raise E.InvalidArgument("missing query parameter 'name' (the task name)")
        private = request.query_params.get("private", "false").lower()
        if private not in ("true", "false", "1", "0"):
            raise E.InvalidArgument(f"private={private!r}; allowed: true or false")
        limit = service.config.max_upload_bytes
        declared = _content_length(request)
        if declared is not None and declared > limit:
            raise E.TooLarge(f"body of {declared} bytes exceeds the upload limit of {limit} bytes")
        with service.upload_slot():  # 429 when max_concurrent_uploads are in progress
            return await _receive_upload(request, name, private, limit)

    async def _receive_upload(request: Request, name: str, private: str, limit: int) -> Response:
        fd, body_path = tempfile.mkstemp(dir=upload_dir, suffix=".upload")
        try:
            size = 0
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise E.TooLarge(f"body exceeds the upload limit of {limit} bytes")
                    f.write(chunk)
            if size == 0:
                raise E.InvalidArgument("empty body; send the dataset (zip, tar or npz) as the request body")
            # ingestion (extraction, decoding, TFDS writing) runs on its own threads, off the
            # default executor that classify's image decoding uses
            # run_in_executor does not copy context variables: the caller's token goes along explicitly
            view = await asyncio.get_running_loop().run_in_executor(
                service.ingest_pool, contextvars.copy_context().run, service.upload_file, name, body_path,
                private in ("true", "1"), request.query_params.get("acl_group"))
        finally:
            if os.path.exists(body_path):
                os.unlink(body_path)
        return JSONResponse(view, status_code=202, headers={"Location": f"/v1/tasks/{name}"})

    @endpoint("list_tasks")
    async def list_tasks(request: Request) -> Response:
        return JSONResponse({"tasks": await asyncio.to_thread(service.list_tasks)})

    @endpoint("get_task")
    async def get_task(request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(service.task_view, request.path_params["name"]))

    @endpoint("delete_task")
    async def delete_task(request: Request) -> Response:
        if service.config.replica:
            return await forward(request)
        admin(request)
        return JSONResponse(await asyncio.to_thread(service.delete_task, request.path_params["name"]))

    @endpoint("evolve_task")
    async def evolve_task(request: Request) -> Response:
        if service.config.replica:
            return await forward(request)
        admin(request)
        return JSONResponse(await asyncio.to_thread(service.evolve, request.path_params["name"]), status_code=202)

    @endpoint("rollback_task")
    async def rollback_task(request: Request) -> Response:
        if service.config.replica:
            return await forward(request)
        admin(request)
        text = request.query_params.get("version")
        if text is not None and not (text.isascii() and text.isdigit() and len(text) <= 18):
            raise E.InvalidArgument(f"version={text[:40]!r}; allowed: a retained system version (an integer >= 0)")
        return JSONResponse(await asyncio.to_thread(service.rollback, request.path_params["name"],
                                                    None if text is None else int(text)))

    @endpoint("classify")
    async def classify(request: Request) -> Response:
        task = request.path_params["name"]
        entered, timeout = time.monotonic(), _timeout_param(request)
        body = await _read_limited(request, service.config.max_message_bytes)
        with service.request_slot("classify"):  # a slow sender held no slot while its body arrived
            return await _classify(request, task, body, entered, timeout)

    async def _classify(request: Request, task: str, body: bytes, entered: float,
                        timeout: float | None) -> Response:
        ctype = request.headers.get("content-type", "")
        top_k = _int_param(request, "top_k", 1)
        encoded: list[bytes] = []
        raw = None
        if ctype.startswith("application/json"):
            try:
                doc = json.loads(body)
                if not isinstance(doc, dict):
                    raise E.InvalidArgument(f"JSON classify body is a {type(doc).__name__}; allowed: an object with "
                                            "'images' (base64 list) or 'raw' {shape, data}")
                top_k = int(doc.get("top_k", top_k))
                if "images" in doc:
                    encoded = [base64.b64decode(s, validate=True) for s in doc["images"]]
                elif "raw" in doc:
                    raw = raw_images(doc["raw"]["shape"], base64.b64decode(doc["raw"]["data"], validate=True))
                else:
                    raise E.InvalidArgument("JSON body needs 'images' (base64 list) or 'raw' {shape, data}")
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
                raise E.InvalidArgument(f"bad JSON classify body: {e}") from e
        else:
            encoded = [body]
        result = await unless_disconnected(request, service.classify(task, encoded=encoded, raw=raw, top_k=top_k,
                                                                     timeout=_left(timeout, entered)))
        return JSONResponse({
            "task": task, "system_version": result.system_version, "path_id": result.path_id,
            "results": [{"labels": labels, "label_ids": ids.tolist(), "scores": scores.tolist()}
                        for labels, ids, scores in zip(result.labels, result.label_ids, result.scores)]})

    @endpoint("openapi")
    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    @endpoint("system")
    async def system(request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(service.system))

    @endpoint("metrics")
    async def metrics(request: Request) -> Response:
        if service.metrics is None:
            raise E.NotFound("metrics are disabled")
        tasks = await asyncio.to_thread(service.list_tasks)
        return Response(service.metrics.render(tasks, service.manager.load_failures),
                        media_type="text/plain; version=0.0.4")

    @endpoint("page")
    async def page(request: Request) -> Response:
        tasks, system_info = await asyncio.to_thread(lambda: (service.list_tasks(), service.system()))
        return HTMLResponse(render_page(tasks, system_info))

    # ---- Open Inference Protocol REST ---------------------------------------------------

    @endpoint("v2_live")
    async def v2_live(request: Request) -> Response:
        return JSONResponse({"live": True})

    @endpoint("v2_ready")
    async def v2_ready(request: Request) -> Response:
        ready = service.manager.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @endpoint("v2_metadata")
    async def v2_metadata(request: Request) -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})

    @endpoint("v2_model_metadata")
    async def v2_model_metadata(request: Request) -> Response:
        return JSONResponse(model_metadata(service, request.path_params["name"]))

    @endpoint("v2_model_ready")
    async def v2_model_ready(request: Request) -> Response:
        name = request.path_params["name"]
        await asyncio.to_thread(service.task_view, name)  # 404 for an unknown task
        ready = name in service.manager.snapshot.paths
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    @endpoint("v2_infer")
    async def v2_infer(request: Request) -> Response:
        name = request.path_params["name"]
        entered = time.monotonic()
        body = await _read_limited(request, service.config.max_message_bytes)
        with service.request_slot("v2_infer"):  # a slow sender held no slot while its body arrived
            return await _infer(request, name, body, entered)

    async def _infer(request: Request, name: str, body: bytes, entered: float) -> Response:
        header_len = request.headers.get(HEADER_LENGTH.lower())
        try:
            n = int(header_len) if header_len is not None else len(body)
            if not 0 <= n <= len(body):
                raise ValueError(f"{HEADER_LENGTH} {n} is outside 0..{len(body)} (the body's length)")
            doc = json.loads(body[:n])
        except ValueError as e:
            raise E.InvalidArgument(f"inference request header is not valid JSON: {e}") from e
        if not isinstance(doc, dict):
            raise E.InvalidArgument(f"inference request is a JSON {type(doc).__name__}; allowed: an object")
        try:  # malformed fields of the request are the client's error
            encoded, pixels, k, want_binary = _parse_infer(doc, body[n:])
            timeout = request_timeout(doc.get("parameters"))
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
            raise E.InvalidArgument(f"malformed inference request: {e}") from e
        result = await unless_disconnected(
            request, service.classify(name, encoded=encoded, raw=pixels, top_k=k or 1, clip_top_k=True,
                                      timeout=_left(timeout, entered)))
        n_classes = result.probabilities.shape[1]
        rows = len(result.probabilities)
        if k:
            strings = classification_strings(result, k)
            out: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [rows, min(k, n_classes)]}
            payload = serialize_bytes_tensor(strings)
            values: list[Any] = [s.decode() for s in strings]
        else:
            out = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(result.probabilities.shape)}
            payload = result.probabilities.astype("<f4").tobytes()
            values = result.probabilities.ravel().tolist()
        response = {"model_name": name, "model_version": str(result.system_version), "id": doc.get("id", ""),
                    "parameters": {"system_version": result.system_version, "path_id": result.path_id},
                    "outputs": [out]}
        if not want_binary:
            out["data"] = values
            return JSONResponse(response)
        out["parameters"] = {"binary_data_size": len(payload)}
        header = json.dumps(response).encode()
        return Response(header + payload, media_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(header))})

    routes = [
        Route("/", page), Route("/metrics", metrics),
        Route("/v1/tasks", upload, methods=["POST"]), Route("/v1/tasks", list_tasks, methods=["GET"]),
        Route("/v1/tasks/{name}", get_task, methods=["GET"]), Route("/v1/tasks/{name}", delete_task, methods=["DELETE"]),
        Route("/v1/tasks/{name}/classify", classify, methods=["POST"]),
        Route("/v1/tasks/{name}/evolve", evolve_task, methods=["POST"]),
        Route("/v1/tasks/{name}/rollback", rollback_task, methods=["POST"]),
        Route("/v1/system", system), Route("/openapi.json", openapi),
        Route("/v2/health/live", v2_live), Route("/v2/health/ready", v2_ready), Route("/v2", v2_metadata),
        Route("/v2/models/{name}", v2_model_metadata), Route("/v2/models/{name}/versions/{version}", v2_model_metadata),
        Route("/v2/models/{name}/ready", v2_model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", v2_model_ready),
        Route("/v2/models/{name}/infer", v2_infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", v2_infer, methods=["POST"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"no route {request.method} {request.url.path}"},
                            status_code=getattr(exc, "status_code", 404))

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def _parse_infer(doc: dict[str, Any], binary: bytes) -> tuple[list[bytes], Any, int | None, bool]:
    """An Open Inference Protocol request's one input as (encoded images, raw pixels, top-k
    of the classification extension or None, binary output wanted).

    Raises:
      InvalidArgument, ValueError, KeyError, TypeError, AttributeError: malformed request.
    """
    offset = 0
    inputs = doc.get("inputs") or []
    if len(inputs) != 1:
        raise E.InvalidArgument(f"{len(inputs)} inputs; exactly one is allowed")
    inp = inputs[0]
    raw = None
    size = (inp.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not 0 <= int(size) <= len(binary):
            raise ValueError(f"binary_data_size {size} is outside 0..{len(binary)} (the binary data sent)")
        raw, offset = binary[offset:offset + int(size)], offset + int(size)
    data = inp.get("data") or []
    flat = list(np.ravel(np.asarray(data, dtype=object))) if data else []
    encoded, pixels = infer_input(inp.get("datatype", ""), list(inp.get("shape", [])), raw,
                                  [int(v) for v in flat] if inp.get("datatype") == "UINT8" and raw is None else [],
                                  [base64.b64decode(v) for v in flat] if inp.get("datatype") == "BYTES" and raw is None else [])
    outputs = [(o.get("name", ""), o.get("parameters") or {}) for o in doc.get("outputs") or []]
    k = requested_classification(outputs)
    want_binary = any(p.get("binary_data", False) for _, p in outputs) or \
        bool((doc.get("parameters") or {}).get("binary_data_output", False))
    return encoded, pixels, k, want_binary


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = _content_length(request)
    if declared is not None and declared > limit:
        raise E.TooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise E.TooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


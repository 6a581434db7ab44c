"""gRPC front end: ``mu2net.v1.Mu2Net``, the Open Inference Protocol
(``inference.GRPCInferenceService``), health checking and reflection, on grpc.aio."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mu2net.server import errors as E
from mu2net.server.oip import (EXTENSIONS, INPUT_NAME, OUTPUT_NAME, SERVER_NAME, SERVER_VERSION,  # noqa: F401
                               classification_strings, deserialize_bytes_tensor, earliest, infer_input,
                               model_metadata, request_timeout, requested_classification, serialize_bytes_tensor)
from mu2net.server._proto import grpc_predict_v2_pb2 as kpb
from mu2net.server._proto import grpc_predict_v2_pb2_grpc as kgrpc
from mu2net.server.service import CALLER_TOKEN, Service, bearer_token, raw_images
from mu2net_client._proto import mu2net_pb2 as pb
from mu2net_client._proto import mu2net_pb2_grpc as pbgrpc

log = logging.getLogger("mu2net.server")


def _status_of(error: Exception, method: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The gRPC status, message and trailing metadata a call of ``method`` that raised
    ``error`` ends with (one table, :mod:`mu2net.server.errors`). An unexpected error is
    logged with a request id and answered INTERNAL with that id and no internals."""
    err = E.to_service_error(error)
    if err is None:  # a bug
        request_id = uuid.uuid4().hex
        log.error("gRPC %s failed (request id %s)", method, request_id, exc_info=error)
        return (grpc.StatusCode.INTERNAL, f"internal server error (request id {request_id})",
                (("mu2net-request-id", request_id),))
    status, _ = E.codes(err)
    metadata: tuple[tuple[str, str], ...] = (("mu2net-error", type(err).__name__),)
    # gRPC's retry pushback (milliseconds): when an overloaded server may be retried;
    # -1: clients' retry policies must not retry (a task not ready, a message too large)
    if isinstance(err, E.Overloaded):
        metadata += (("grpc-retry-pushback-ms", str(int(err.retry_after * 1000))),)
    elif status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        metadata += (("grpc-retry-pushback-ms", "-1"),)
    return status, str(err), metadata


def _caller(context: grpc.aio.ServicerContext) -> None:
    """Sets this call's caller token (:data:`CALLER_TOKEN`) from its ``authorization`` metadata."""
    auth = next((str(v) for k, v in (context.invocation_metadata() or ()) if k == "authorization"), None)
    CALLER_TOKEN.set(bearer_token(auth))


def _handle(api: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Maps service errors to gRPC status codes (:func:`_status_of`) and records metrics."""
    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            code = "OK"
            done = self.service.metrics.observe(api, fn.__name__) if self.service.metrics is not None else None
            _caller(context)  # this call's task
            try:
                with self.service.request_slot(fn.__name__):  # RESOURCE_EXHAUSTED when all are taken
                    return await fn(self, request, context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:  # the caller cancelled or went away
                code = "CANCELLED"
                raise
            except Exception as e:
                status, message, metadata = _status_of(e, fn.__name__)
                code = status.name
                await context.abort(status, message, trailing_metadata=metadata)
            finally:
                if done is not None:
                    done(code, time.perf_counter() - t0)
        return handler
    return wrap


#: Requests of one ClassifyStream call in progress or answered but not yet sent, at most
#: (and at most ``--max-concurrent-requests``): the server reads the stream's next request
#: only when an answer was handed to gRPC, so a client that stops reading stops the reading.
STREAM_WINDOW = 256


def _task_message(view: dict[str, Any]) -> pb.Task:
    m = view.get("metrics", {})
    evolution = view.get("evolution") or {}
    ev = view.get("evolver")
    return pb.Task(name=view["name"], state=view["state"], private=view["private"], labels=view["labels"],
                   system_version=view["system_version"], path_id=view["path_id"] or "",
                   validation_accuracy=m.get("validation_accuracy") or 0.0,
                   test_accuracy=m.get("test_accuracy") or 0.0, iterations_done=view["iterations_done"],
                   error=view["error"] or "", activated_params=m.get("activated_params") or 0,
                   improved_at=view.get("improved_at") or 0.0,
                   history=[pb.AccuracyPoint(system_version=h["system_version"], time=h["time"],
                                             validation_accuracy=h["validation_accuracy"] or 0.0,
                                             test_accuracy=h["test_accuracy"] or 0.0)
                            for h in view.get("history", ())],
                   paused=bool(evolution.get("paused")), stale_iterations=evolution.get("stale_iterations") or 0,
                   pinned=bool(evolution.get("pinned")),
                   evolver=None if ev is None else pb.EvolverActivity(
                       task=ev.get("task") or "", iteration=ev.get("iteration") or 0,
                       generation=ev.get("generation") or 0, generations=ev.get("generations") or 0,
                       children_running=ev.get("children_running") or 0, phase=ev.get("phase") or "",
                       updated=ev.get("updated") or 0.0))


class Mu2NetServicer(pbgrpc.Mu2NetServicer):  # type: ignore[misc]
    def __init__(self, service: Service) -> None:
        self.service = service

    @_handle("grpc")
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        return await self._classify(request, context.time_remaining())

    async def _classify(self, request: pb.ClassifyRequest, timeout: float | None) -> pb.ClassifyResponse:
        raw = None
        if request.HasField("raw"):
            raw = raw_images(request.raw.shape, request.raw.data)  # one copy of the bytes
        result = await self.service.classify(request.task, encoded=list(request.encoded_images), raw=raw,
                                             top_k=request.top_k or 1, timeout=timeout)
        resp = pb.ClassifyResponse(system_version=result.system_version, path_id=result.path_id)
        results = resp.results
        for labels, ids, scores in zip(result.labels, result.label_ids.tolist(), result.scores.tolist()):
            r = results.add()  # filling the repeated fields in place is faster than keyword construction
            r.labels.extend(labels)
            r.label_ids.extend(ids)
            r.scores.extend(scores)
        return resp

    async def ClassifyStream(self, request_iterator: AsyncIterator[pb.ClassifyRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Each request of the stream is served as a Classify call (its own request slot, the
        call's deadline, the same errors) concurrently with the others, at most
        :data:`STREAM_WINDOW` at once, and answered in completion order with its id; an
        error answers that request only (:class:`pb.ClassifyStreamResponse` error fields)."""
        _caller(context)  # copied into every request's asyncio task
        metrics = self.service.metrics
        answers: asyncio.Queue[pb.ClassifyStreamResponse | None] = asyncio.Queue()
        limit = self.service.config.max_concurrent_requests
        window = asyncio.Semaphore(min(STREAM_WINDOW, limit) if limit is not None else STREAM_WINDOW)
        running: set[asyncio.Task[None]] = set()

        async def one(request: pb.ClassifyRequest) -> None:
            t0, code = time.perf_counter(), "OK"
            done = metrics.observe("grpc", "ClassifyStream") if metrics is not None else None
            try:
                with self.service.request_slot("ClassifyStream"):  # RESOURCE_EXHAUSTED when all are taken
                    answer = pb.ClassifyStreamResponse(
                        id=request.id, response=await self._classify(request, context.time_remaining()))
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as e:
                status, message, metadata = _status_of(e, "ClassifyStream")
                code, meta = status.name, dict(metadata)
                answer = pb.ClassifyStreamResponse(id=request.id, error_code=status.name, error_message=message,
                                                   error_type=meta.get("mu2net-error", ""),
                                                   retry_after_ms=max(0, int(meta.get("grpc-retry-pushback-ms", 0))))
            finally:
                if done is not None:
                    done(code, time.perf_counter() - t0)
            answers.put_nowait(answer)  # its window slot is freed once gRPC took the answer

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(set(running))
            finally:
                answers.put_nowait(None)  # the end of the answers (also when reading failed)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
                window.release()
            await reader  # re-raises what reading the stream raised
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:  # reading the stream failed: the call ends with its status
            status, message, metadata = _status_of(e, "ClassifyStream")
            await context.abort(status, message, trailing_metadata=metadata)
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    @_handle("grpc")
    async def ListTasks(self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        views = await asyncio.to_thread(self.service.list_tasks)  # SQLite reads off the event loop
        return pb.ListTasksResponse(tasks=[_task_message(v) for v in views])

    @_handle("grpc")
    async def GetTask(self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext) -> pb.Task:
        return _task_message(await asyncio.to_thread(self.service.task_view, request.name))


class InferenceServicer(kgrpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """``inference.GRPCInferenceService``: model name = task name."""

    def __init__(self, service: Service) -> None:
        self.service = service

    @_handle("kserve_grpc")
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    @_handle("kserve_grpc")
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self.service.manager.ready)

    @_handle("kserve_grpc")
    async def ModelReady(self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> kpb.ModelReadyResponse:
        await asyncio.to_thread(self.service.task_view, request.name)  # NOT_FOUND for an unknown task
        return kpb.ModelReadyResponse(ready=request.name in self.service.manager.snapshot.paths)

    @_handle("kserve_grpc")
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    @_handle("kserve_grpc")
    async def ModelMetadata(self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> kpb.ModelMetadataResponse:
        md = model_metadata(self.service, request.name)
        T = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"],
                                         inputs=[T(**t) for t in md["inputs"]], outputs=[T(**t) for t in md["outputs"]])

    @_handle("kserve_grpc")
    async def ModelInfer(self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext) -> kpb.ModelInferResponse:
        entered = time.monotonic()  # the timeout parameter counts from here, as the gRPC deadline does
        if len(request.inputs) != 1:
            raise E.InvalidArgument(f"{len(request.inputs)} inputs; exactly one is allowed ({INPUT_NAME}: UINT8 "
                                    "[N,H,W,C], or BYTES [N] of encoded images)")
        inp = request.inputs[0]
        raw = request.raw_input_contents[0] if request.raw_input_contents else None
        encoded, pixels = infer_input(inp.datatype, list(inp.shape), raw,
                                      list(inp.contents.uint_contents), list(inp.contents.bytes_contents))
        outputs = [(o.name, {k: _param(v) for k, v in o.parameters.items()}) for o in request.outputs]
        k = requested_classification(outputs)
        parameter = request_timeout({key: _param(v) for key, v in request.parameters.items()})
        timeout = earliest(context.time_remaining(),
                           None if parameter is None else parameter - (time.monotonic() - entered))
        result = await self.service.classify(request.model_name, encoded=encoded, raw=pixels, top_k=k or 1,
                                             clip_top_k=True, timeout=timeout)
        n_classes = result.probabilities.shape[1]
        resp = kpb.ModelInferResponse(model_name=request.model_name, model_version=str(result.system_version),
                                      id=request.id)
        resp.parameters["system_version"].int64_param = result.system_version
        resp.parameters["path_id"].string_param = result.path_id
        n = len(result.probabilities)
        if k:
            resp.outputs.add(name=OUTPUT_NAME, datatype="BYTES", shape=[n, min(k, n_classes)])
            resp.raw_output_contents.append(serialize_bytes_tensor(classification_strings(result, k)))
        else:
            resp.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=list(result.probabilities.shape))
            resp.raw_output_contents.append(result.probabilities.astype("<f4").tobytes())
        return resp


def _param(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


async def start_grpc(service: Service, host: str, port: int, max_message_bytes: int,
                     tls: tuple[str, str, str | None] | None = None) -> tuple[grpc.aio.Server, int]:
    """Starts the gRPC server; returns it and the bound port.

    ``tls`` = (certificate chain PEM file, private key PEM file, client CA PEM file or None):
    serve over TLS, and with a client CA require client certificates signed by it (mutual TLS).
    """
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.aio.server(options=options)
    pbgrpc.add_Mu2NetServicer_to_server(Mu2NetServicer(service), server)
    kgrpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["Mu2Net"].full_name,
             kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        cert, key, client_ca = tls
        with open(cert, "rb") as f:
            chain = f.read()
        with open(key, "rb") as f:
            private = f.read()
        ca = None
        if client_ca is not None:
            with open(client_ca, "rb") as f:
                ca = f.read()
        credentials = grpc.ssl_server_credentials([(private, chain)], root_certificates=ca,
                                                  require_client_auth=ca is not None)
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    await server.start()
    for name in ("", names[0], names[1]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.health_servicer = health_servicer
    return server, bound

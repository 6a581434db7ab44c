"""The SDK without a server: task resources of older and newer servers, and argument checks
that run before any request."""

from __future__ import annotations

import asyncio

import pytest

from mu2net_client import AccuracyPoint, AsyncClient, Client, InvalidArgumentError, Task

UNREACHABLE = ("127.0.0.1:1", "http://127.0.0.1:1")  # nothing listens: any request would fail

OLD_SERVER_TASK = {"name": "digits", "state": "serving", "private": False, "labels": ["0", "1"],
                   "system_version": 3, "path_id": "abc", "iterations_done": 1,
                   "metrics": {"test_accuracy": 0.5}, "error": None}


def test_task_from_an_older_server_gets_defaults():
    task = Task.from_json(OLD_SERVER_TASK)
    assert (task.improved_at, task.history, task.paused, task.stale_iterations, task.evolver) == \
        (None, (), False, 0, None)
    assert task.metrics == {"test_accuracy": 0.5} and task.labels == ("0", "1")


def test_task_from_json_reads_history_evolution_and_evolver():
    doc = {**OLD_SERVER_TASK, "improved_at": 1700000100.5,
           "history": [{"system_version": 2, "time": 1700000000.0, "validation_accuracy": 0.4, "test_accuracy": 0.3},
                       {"system_version": 3, "time": 1700000100.5, "validation_accuracy": 0.6,
                        "test_accuracy": None}],
           "evolution": {"paused": True, "stale_iterations": 4},
           "evolver": {"state": "training", "task": "digits", "iteration": 2, "generation": 1}}
    task = Task.from_json(doc)
    assert task.history == (AccuracyPoint(2, 1700000000.0, 0.4, 0.3), AccuracyPoint(3, 1700000100.5, 0.6, None))
    assert task.improved_at == 1700000100.5 and task.paused and task.stale_iterations == 4
    assert task.evolver == doc["evolver"] and task.evolver is not doc["evolver"]


@pytest.mark.parametrize("accuracy, metric, match", [
    (0.5, "accuracy", r"metric='accuracy'; allowed: 'test_accuracy', 'validation_accuracy'"),
    (1.5, "test_accuracy", r"accuracy=1\.5; allowed: a fraction in \[0, 1\]"),
    (-0.1, "validation_accuracy", r"accuracy=-0\.1; allowed: a fraction in \[0, 1\]"),
])
def test_wait_until_rejects_bad_targets_before_any_request(accuracy, metric, match):
    with Client(*UNREACHABLE, retries=0) as client:
        with pytest.raises(InvalidArgumentError, match=match) as e:
            client.wait_until("digits", accuracy, metric=metric, timeout=1, progress=False)
    assert isinstance(e.value, ValueError)

    async def main():
        async with AsyncClient(*UNREACHABLE, retries=0) as client:
            with pytest.raises(InvalidArgumentError, match=match):
                await client.wait_until("digits", accuracy, metric=metric, timeout=1, progress=False)

    asyncio.run(main())


from mu2net_client._proto import mu2net_pb2_grpc as _pbgrpc  # noqa: E402


class _FlakyServicer(_pbgrpc.Mu2NetServicer):
    """A real gRPC Mu2Net server whose Classify answers from a script of status codes."""

    def __init__(self, script):
        self.script, self.calls = list(script), 0

    def Classify(self, request, context):
        import grpc

        from mu2net_client._proto import mu2net_pb2 as pb

        self.calls += 1
        step = self.script.pop(0) if self.script else "ok"
        if step == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        if step == "overloaded":
            context.set_trailing_metadata((("mu2net-error", "Overloaded"), ("grpc-retry-pushback-ms", "50")))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded")
        if step == "slow":  # answers long after the caller's deadline
            import time
            time.sleep(6.0)
        if step == "unauthenticated":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin bearer token")
        if step == "internal":
            context.abort(grpc.StatusCode.INTERNAL, "internal server error (request id 1)")
        if step == "not_ready":
            context.set_trailing_metadata((("mu2net-error", "NotReady"), ("grpc-retry-pushback-ms", "-1")))
            context.abort(grpc.StatusCode.UNAVAILABLE, "task 'x' has no served path yet")
        return pb.ClassifyResponse(system_version=7, path_id="p")


@pytest.mark.parametrize("script, retries, calls, error", [
    (["unavailable", "overloaded"], 3, 3, None),  # transient failures are retried by gRPC's policy
    (["not_ready"], 3, 1, "NotReadyError"),       # pushback -1: not retried
    (["overloaded"] * 5, 2, 3, "OverloadedError"),  # attempts end: the error names the retry hint
    (["unavailable"], 0, 1, "TransportError"),      # retries=0: no policy
    (["unauthenticated"], 3, 1, "AuthenticationError"),  # not retryable: one call
    (["internal"], 3, 1, "ServerError"),
    (["slow"], 3, 1, "TimeoutError"),               # DEADLINE_EXCEEDED (the call's timeout of 2 s)
])
def test_idempotent_calls_are_retried_by_grpcs_retry_policy(script, retries, calls, error):
    from concurrent import futures

    import grpc
    import numpy as np

    import mu2net_client
    from mu2net_client._proto import mu2net_pb2_grpc as pbgrpc

    servicer = _FlakyServicer(script)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pbgrpc.add_Mu2NetServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", UNREACHABLE[1], retries=retries, timeout=20) as client:
            images = np.zeros((1, 8, 8, 1), np.uint8)
            timeout = 2.0 if script == ["slow"] else None  # a per-call timeout below the client's 20 s
            if error is None:
                assert client.classify("x", images).system_version == 7
            else:
                with pytest.raises(getattr(mu2net_client, error)) as e:
                    client.classify("x", images, timeout=timeout)
                if error == "OverloadedError":
                    assert e.value.retry_after == 0.05
        assert servicer.calls == calls
    finally:
        server.stop(None)


def test_http_errors_map_to_the_sdk_hierarchy():
    import httpx

    from mu2net_client import (AlreadyExistsError, AuthenticationError, ConflictError, NotReadyError, OverloadedError,
                               TimeoutError)
    from mu2net_client.errors import ServerError, TransportError, from_http

    e = from_http(httpx.Response(429, json={"error": "queued"}, headers={"Retry-After": "2"}))
    assert isinstance(e, OverloadedError) and e.retry_after == 2.0 and "queued" in str(e)
    assert isinstance(from_http(httpx.Response(503, json={"error": "x"})), NotReadyError)
    assert isinstance(from_http(httpx.Response(504, json={"error": "x"})), TimeoutError)
    assert isinstance(from_http(httpx.Response(500, json={"error": "internal server error"})), ServerError)
    assert isinstance(from_http(httpx.Response(401, json={"error": "x"})), AuthenticationError)
    assert type(from_http(httpx.Response(502, text="<html>bad gateway</html>"))) is TransportError  # not JSON
    # a 409 is a lost race (ABORTED) or a name taken (ALREADY_EXISTS), told apart by the body's code
    assert type(from_http(httpx.Response(409, json={"error": "x", "code": "ABORTED"}))) is ConflictError
    assert type(from_http(httpx.Response(409, json={"error": "x", "code": "ALREADY_EXISTS"}))) is AlreadyExistsError
    assert type(from_http(httpx.Response(409, json=["not", "an", "object"]))) is AlreadyExistsError
    assert type(from_http(httpx.Response(500, text="<html>oops</html>"))) is ServerError


@pytest.mark.parametrize("header, seconds", [
    ("2", 2.0), ("0", 0.0), ("1.5", 1.5), (" 3 ", 3.0),
    ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),  # an HTTP-date: from "now" (07:28:00 below)
    ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),   # in the past
    ("Wed Oct 21 07:28:10 2015", 10.0),       # the asctime form, which carries no zone: GMT
    ("soon", None), ("-1", None), ("nan", None), ("inf", None), ("", None), (None, None),
])
def test_retry_after_is_delay_seconds_or_an_http_date(header, seconds):
    import email.utils

    from mu2net_client.errors import parse_retry_after

    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert parse_retry_after(header, now=now) == seconds


class _LocalHTTP:
    """A real HTTP server (http.server on 127.0.0.1, in a daemon thread) answering every GET
    and POST with :meth:`answer`'s (status, JSON document, headers)."""

    def __init__(self):
        import http.server
        import json
        import threading

        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self, body: bytes) -> None:
                code, doc, headers = owner.answer(self.command, self.path.split("?")[0], body)
                payload = json.dumps(doc).encode()
                self.send_response(code)
                for name, value in {**headers, "Content-Type": "application/json",
                                    "Content-Length": str(len(payload))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):  # noqa: N802
                self._serve(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def do_GET(self):  # noqa: N802
                self._serve(b"")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict, dict[str, str]]:
        raise NotImplementedError

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class _OverloadedHTTP(_LocalHTTP):
    """Refuses the first ``refusals`` requests with 429 and ``Retry-After: retry_after``, then
    answers like mu2net's task endpoints; records each request's method, path, body and
    arrival time."""

    def __init__(self, refusals: int, retry_after: str = "0"):
        self.refusals, self.retry_after, self.requests, self.times = refusals, retry_after, [], []
        super().__init__()

    def answer(self, method, path, body):
        import time

        self.requests.append((method, path, body))
        self.times.append(time.monotonic())
        if len(self.requests) <= self.refusals:
            return 429, {"error": "2 uploads are in progress"}, {"Retry-After": self.retry_after}
        return 202, {**OLD_SERVER_TASK, "state": "queued"}, {}


@pytest.mark.parametrize("refusals, retries, ok", [(2, 3, True), (3, 2, False)])
def test_an_upload_refused_with_429_is_retried_after_retry_after_with_the_whole_body(tmp_path, refusals, retries,
                                                                                      ok):
    from mu2net_client import OverloadedError

    dataset = tmp_path / "data.npz"
    dataset.write_bytes(b"PK" + bytes(range(256)) * 64)  # an upload from a file: rewound for each attempt
    for sync in (True, False):
        server = _OverloadedHTTP(refusals)
        try:
            if sync:
                with Client(UNREACHABLE[0], server.url, retries=retries) as client:
                    call = lambda: client.upload("digits", dataset)  # noqa: E731
                    outcome = call() if ok else pytest.raises(OverloadedError, call)
            else:
                async def main():
                    async with AsyncClient(UNREACHABLE[0], server.url, retries=retries) as client:
                        if ok:
                            return await client.upload("digits", dataset)
                        with pytest.raises(OverloadedError) as e:
                            await client.upload("digits", dataset)
                        return e
                outcome = asyncio.run(main())
            assert len(server.requests) == (refusals + 1 if ok else retries + 1)
            assert all(r == ("POST", "/v1/tasks", dataset.read_bytes()) for r in server.requests)
            if ok:
                assert outcome.name == "digits" and outcome.state == "queued"
            else:
                assert outcome.value.retry_after == 0.0 and "uploads are in progress" in str(outcome.value)
        finally:
            server.close()


def test_reads_refused_with_429_are_retried_after_retry_after():
    server = _OverloadedHTTP(2, retry_after="0.4")
    try:
        with Client(UNREACHABLE[0], server.url, retries=3) as client:
            assert client.task("digits").name == "digits"
        assert [r[:2] for r in server.requests] == [("GET", "/v1/tasks/digits")] * 3
        # each retry waited the server's hint (a lower bound: a sleep is never shorter)
        gaps = [b - a for a, b in zip(server.times, server.times[1:])]
        assert all(g >= 0.39 for g in gaps), gaps
    finally:
        server.close()


class _TaskStatesHTTP(_LocalHTTP):
    """Answers ``GET /v1/tasks/NAME`` with the next of ``states`` (the last one repeated), as
    a task resource."""

    def __init__(self, states):
        self.states, self.polls = list(states), 0
        super().__init__()

    def answer(self, method, path, body):
        state = self.states[min(self.polls, len(self.states) - 1)]
        self.polls += 1
        return 200, {**OLD_SERVER_TASK, "state": state,
                     "error": "the evolver failed 3 times: boom" if state == "failed" else None}, {}


@pytest.mark.parametrize("states, timeout, error, match", [
    (["queued", "training", "failed"], 60, "ServerError", "task 'digits' failed: the evolver failed 3 times: boom"),
    (["queued"], 0.5, "TimeoutError", r"task 'digits' still queued after 0.5s"),
])
def test_wait_until_serving_raises_for_a_failed_task_and_at_its_timeout(states, timeout, error, match):
    import mu2net_client

    for sync in (True, False):
        server = _TaskStatesHTTP(states)
        try:
            if sync:
                with Client(UNREACHABLE[0], server.url, retries=0) as client:
                    with pytest.raises(getattr(mu2net_client, error), match=match):
                        client.wait_until_serving("digits", timeout=timeout, poll=0.05, progress=False)
            else:
                async def main():
                    async with AsyncClient(UNREACHABLE[0], server.url, retries=0) as client:
                        with pytest.raises(getattr(mu2net_client, error), match=match):
                            await client.wait_until_serving("digits", timeout=timeout, poll=0.05, progress=False)
                asyncio.run(main())
            assert server.polls >= (3 if error == "ServerError" else 2)
        finally:
            server.close()

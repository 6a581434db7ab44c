"""Property-based fuzzing of a real server: the HTTP API against its OpenAPI document with
schemathesis, the gRPC messages with hypothesis. No input may get a 5xx (HTTP) or
UNKNOWN / INTERNAL / DATA_LOSS (gRPC), or kill the server; the store stays unchanged.

Bounded here to a few hundred cases; a soak run is the same with more examples
(docs/reliability.md):

    MU2NET_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY, TINY_EVOLVER, digits_splits
from mu2net import root as R
from mu2net.evolver import Evolver
from mu2net.root import init_root
from mu2net.ingest import add_task_arrays
from mu2net.server.launcher import RunningServer
from mu2net.server.openapi import document as openapi_document
from mu2net.store import Store
from mu2net_client._proto import mu2net_pb2 as pb
from mu2net_client._proto import mu2net_pb2_grpc as pbgrpc

EXAMPLES = int(os.environ.get("MU2NET_FUZZ_EXAMPLES", "25"))
TOKEN = "fuzz-token"
SERVER_ERRORS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """A server without evolver over a store with 'digits' served (10 classes, 8x8x1)."""
    data = tmp_path_factory.mktemp("fuzz") / "store"
    store = Store(data)
    arch, params = R.random_root(TINY, 0, seed=0)
    init_root(store, arch, params, {"mu": 0.3, "learning_rate": 0.05, "flip": False, "crop": False})
    add_task_arrays(store, "digits", digits_splits(), [str(i) for i in range(10)], source="test")
    Evolver(store, TINY_EVOLVER, progress=False).active_phase("digits")
    before = (store.system_version(), [(t.name, t.state) for t in store.list_tasks()], store.verify())
    server = RunningServer(str(data), ["--image-size", "8", "--patch-size", "4", "--width", "16", "--mlp-dim", "32",
                                       "--num-heads", "2", "--quiet", "--no-evolver", "--admin-token", TOKEN,
                                       "--max-upload-bytes", str(1 << 20), "--max-message-bytes", str(1 << 20)])
    yield server, store, before
    assert store.verify() == before[2] == []
    assert server.proc.poll() is None, "the server died under fuzzing:\n" + "".join(server.output[-60:])
    assert server.stop() == 0, "".join(server.output[-40:])
    store.close()


def test_openapi_document_names_every_route(fuzz_server):
    server, _, _ = fuzz_server
    doc = httpx.get(f"{server.http}/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/tasks", "/v1/tasks/{name}", "/v1/tasks/{name}/classify", "/v1/tasks/{name}/evolve",
            "/v1/tasks/{name}/rollback", "/v1/system",
            "/v2/models/{name}/infer", "/metrics", "/openapi.json"} <= set(doc["paths"])
    assert httpx.get(f"{server.http}/v1/tasks/digits").json()["name"] == "digits"


_raw = st.builds(lambda shape, data: pb.RawTensor(shape=shape, data=data),
                 st.lists(st.integers(-2 ** 40, 2 ** 40) | st.sampled_from([0, 1, 8, 3]), max_size=5),
                 st.binary(max_size=2048))


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


_images = st.lists(st.binary(max_size=512) | st.just(_png()) | st.builds(lambda b: _png()[:b], st.integers(0, 60)),
                   max_size=4)
_hostile = st.builds(
    lambda task, images, raw, use_raw, top_k: pb.ClassifyRequest(
        task=task, encoded_images=[] if use_raw else images, raw=raw if use_raw else None, top_k=top_k),
    st.sampled_from(["digits", "", "nope", "x" * 300]) | st.text(max_size=20),
    _images, _raw, st.booleans(), st.integers(-2 ** 31, 2 ** 31 - 1))
#: well-formed requests (encoded PNGs or a matching raw tensor, top_k 0..10), so the fuzzed
#: mix also exercises the path that answers
_valid = st.builds(
    lambda n, use_raw, top_k: pb.ClassifyRequest(
        task="digits", encoded_images=[] if use_raw else [_png()] * n,
        raw=pb.RawTensor(shape=[n, 8, 8, 1], data=bytes(64 * n)) if use_raw else None, top_k=top_k),
    st.integers(1, 3), st.booleans(), st.integers(0, 10))
_requests = _hostile | _valid


def _infer_request(model, datatype, shape, raw, uints, items, k):
    from tritonclient.grpc import service_pb2 as kpb  # the OIP messages (one copy of the protos per process)

    outputs = [] if k is None else [kpb.ModelInferRequest.InferRequestedOutputTensor(
        name="PROBABILITIES" if k >= 0 else "other", parameters={"classification": kpb.InferParameter(int64_param=k)})]
    return kpb.ModelInferRequest(
        model_name=model, outputs=outputs, raw_input_contents=[] if raw is None else [raw],
        inputs=[kpb.ModelInferRequest.InferInputTensor(
            name="IMAGE", datatype=datatype, shape=shape,
            contents=kpb.InferTensorContents(uint_contents=uints, bytes_contents=items))])


_png_element = st.builds(lambda: len(_png()).to_bytes(4, "little") + _png())
_infer_hostile = st.builds(
    _infer_request, st.sampled_from(["digits", "nope", ""]), st.sampled_from(["UINT8", "BYTES", "FP32", ""]),
    st.lists(st.integers(-2 ** 62, 2 ** 62) | st.sampled_from([1, 8, 2 ** 32]), max_size=5),
    st.none() | st.binary(max_size=1024) | _png_element | st.just(b"\xff\xff\xff\xff"),
    st.lists(st.integers(0, 2 ** 32 - 1), max_size=80), st.lists(st.binary(max_size=64) | st.just(_png()), max_size=3),
    st.none() | st.integers(-2 ** 63, 2 ** 63 - 1))
_infer_valid = st.one_of(
    st.builds(_infer_request, st.just("digits"), st.just("UINT8"), st.just([1, 8, 8, 1]), st.none() | st.just(bytes(64)),
              st.just([0] * 64), st.just([]), st.none() | st.integers(1, 12)),
    st.builds(_infer_request, st.just("digits"), st.just("BYTES"), st.just([1]), st.none() | _png_element,
              st.just([]), st.just([_png()]), st.none() | st.integers(1, 12)))


def test_hypothesis_finds_no_server_error_in_the_grpc_messages(fuzz_server):
    # runs before the schemathesis test, whose random deletes (admin token) may remove 'digits'
    server, store, _ = fuzz_server
    assert store.best_path("digits") is not None  # the valid share has a served task to answer
    with grpc.insecure_channel(server.grpc) as channel:
        stub = pbgrpc.Mu2NetStub(channel)
        codes: dict[str, int] = {}

        @settings(max_examples=EXAMPLES * 8, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(_requests)
        def classify(request):
            try:
                stub.Classify(request, timeout=30)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as e:
                assert e.code() not in SERVER_ERRORS, (request, e.code(), e.details())
                codes[e.code().name] = codes.get(e.code().name, 0) + 1

        classify()
        assert codes.get("OK", 0) > 0, codes  # the valid share answered
        infer_codes: dict[str, int] = {}

        @settings(max_examples=EXAMPLES * 8, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(_infer_hostile | _infer_valid)
        def model_infer(request):
            try:
                channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=lambda b: b)(request, timeout=30)
                infer_codes["OK"] = infer_codes.get("OK", 0) + 1
            except grpc.RpcError as e:
                assert e.code() not in SERVER_ERRORS, (request, e.code(), e.details())
                infer_codes[e.code().name] = infer_codes.get(e.code().name, 0) + 1

        model_infer()
        assert infer_codes.get("OK", 0) > 0 and infer_codes.get("INVALID_ARGUMENT", 0) > 0, infer_codes
        print(f"hypothesis gRPC ModelInfer: {sum(infer_codes.values())} cases, status codes {infer_codes}")
        for name in ("digits", "", "nope", "a" * 200):
            try:
                stub.GetTask(pb.GetTaskRequest(name=name), timeout=30)
            except grpc.RpcError as e:
                assert e.code() not in SERVER_ERRORS, (name, e.code())
        assert codes.get("INVALID_ARGUMENT", 0) > 0 and codes.get("NOT_FOUND", 0) > 0, codes
        print(f"hypothesis gRPC Classify: {sum(codes.values())} cases, status codes {codes}")
    assert store.verify() == []


def test_schemathesis_finds_no_server_error_in_the_http_api(fuzz_server, tmp_path):
    server, store, (version, _, _) = fuzz_server
    st_cli = shutil.which("st", path=os.path.dirname(sys.executable)) or shutil.which("st")
    assert st_cli, "schemathesis is a test dependency (pyproject [test])"
    proc = subprocess.run(
        [st_cli, "run", f"{server.http}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", str(EXAMPLES), "--seed", "0", "-H", f"Authorization: Bearer {TOKEN}",
         "--request-timeout", "30", "--no-color",
         "--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",  # deadlines long enough (see it)
             "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                            os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", proc.stdout)
    tested = re.search(r"Tested: (\d+)", proc.stdout)
    generated = re.search(r"(\d+) generated", proc.stdout)
    operations = sum(m in ("get", "post", "delete") for p in openapi_document()["paths"].values() for m in p)
    assert selected and tested and int(tested.group(1)) == int(selected.group(2)) >= operations - 1, proc.stdout[-3000:]
    assert generated and int(generated.group(1)) >= 10 * EXAMPLES, proc.stdout[-3000:]  # cases actually sent
    assert "Server error" not in proc.stdout
    print(f"schemathesis: {tested.group(1)} operations, {generated.group(1)} cases, no server error")
    # the store is consistent (random uploads were refused or made new tasks; deletes of
    # random names found nothing, or removed a task whole), and its version never went back
    assert store.verify() == [] and store.system_version() >= version

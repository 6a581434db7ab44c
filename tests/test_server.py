"""The real server on 127.0.0.1: SDK end to end, tritonclient (grpc and http), bad input,
health and reflection, metrics, the status page, and hot-swap under load."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import zipfile

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import TINY, TINY_EVOLVER, digits_splits

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import hostile  # noqa: E402  (the hostile-input catalogue, shared with its benchmark)
from mu2net import root as R
from mu2net.evolver import Evolver
from mu2net.ingest import add_task_arrays
from mu2net.root import init_root
from mu2net.store import Store
from mu2net_client import (AlreadyExistsError, AuthenticationError, Client, InvalidArgumentError, NotFoundError,
                           NotReadyError, TooLargeError)
from mu2net_client._proto import mu2net_pb2 as pb
from mu2net_client._proto import mu2net_pb2_grpc as pbgrpc
from mu2net.server.launcher import RunningServer

TINY_SERVE_ARGS = ["--image-size", "8", "--patch-size", "4", "--width", "16", "--mlp-dim", "32", "--num-heads", "2",
                   "--generations", "2", "--children", "2", "--cycles", "4", "--sample-cap", "512",
                   "--batch-size", "32", "--quiet", "--iterations", "1", "--root-hparam", "flip=false",
                   "--root-hparam", "crop=false", "--root-hparam", "mu=0.3", "--root-hparam", "learning_rate=0.05",
                   "--root-blocks", "0", "--first-answer-epochs", "0"]
TOKEN = hostile.TOKEN  # the static server's admin token (its limits: hostile.SERVER_LIMITS)


def _npz_dict(splits):
    return {"x_train": splits["train"][0], "y_train": splits["train"][1], "x_val": splits["validation"][0],
            "y_val": splits["validation"][1], "x_test": splits["test"][0], "y_test": splits["test"][1]}


@pytest.fixture(scope="module")
def static_server(tmp_path_factory):
    """A server without evolver over a store with 'digits' served and 'pending' queued.

    The test process publishes new versions to the same store (hot-swap test)."""
    data = tmp_path_factory.mktemp("static") / "store"
    store = Store(data)
    arch, params = R.random_root(TINY, 0, seed=0)
    init_root(store, arch, params, {"mu": 0.3, "learning_rate": 0.05, "flip": False, "crop": False})
    add_task_arrays(store, "digits", digits_splits(), [str(i) for i in range(10)], source="test")
    add_task_arrays(store, "pending", digits_splits(lambda y: y % 2), ["even", "odd"], source="test")
    Evolver(store, TINY_EVOLVER, progress=False).active_phase("digits")
    server = RunningServer(str(data), [*TINY_SERVE_ARGS, "--no-evolver", *hostile.SERVER_LIMITS])
    yield server, store
    assert server.stop() == 0, "".join(server.output[-40:])
    store.close()


def test_end_to_end_upload_wait_classify_with_the_sdk(tmp_path):
    server = RunningServer(str(tmp_path / "store"), TINY_SERVE_ARGS)
    try:
        splits = digits_splits(limit=900)
        with Client(server.grpc, server.http, timeout=60) as client:
            task = client.upload("digits", _npz_dict(splits))
            assert task.state == "queued" and task.labels == tuple(str(i) for i in range(10))
            task = client.wait_until_serving("digits", timeout=600, progress=False)
            assert task.state == "serving" and task.system_version >= 2
            x, y = splits["test"]
            result = client.classify("digits", x, top_k=3)
            acc = float(np.mean([r.label_ids[0] for r in result.results] == y))
            assert acc > 0.3, acc  # chance is 0.1
            assert result.system_version == task.system_version and result.path_id == task.path_id
            assert all(len(r.labels) == 3 and r.scores[0] >= r.scores[1] >= r.scores[2] for r in result.results)
            # the same images as encoded PNG bytes give the same answers
            pngs = []
            for img in x[:8]:
                buf = io.BytesIO()
                Image.fromarray(img[..., 0]).save(buf, format="PNG")
                pngs.append(buf.getvalue())
            encoded = client.classify("digits", pngs)
            assert [r.label_ids[0] for r in encoded.results] == [r.label_ids[0] for r in result.results[:8]]
            # the supervisor restarts a killed evolver process
            children = [int(p) for p in open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split()]
            assert children, "the evolver process runs"
            os.kill(children[0], 9)
            import time

            deadline = time.time() + 60
            while time.time() < deadline:
                metrics = httpx.get(server.http + "/metrics").text
                if "mu2net_evolver_restarts_total 1.0" in metrics:
                    break
                time.sleep(0.5)
            assert "mu2net_evolver_restarts_total 1.0" in metrics
    finally:
        assert server.stop() == 0, "".join(server.output[-40:])
    # a stopped evolver says so: the status does not keep showing the phase it was killed in
    with Store(tmp_path / "store") as store:
        assert store.evolver_status()["state"] == "stopped"


def test_tritonclient_grpc(static_server):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    server, _ = static_server
    c = tg.InferenceServerClient(server.grpc)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("digits") and not c.is_model_ready("pending")
    assert "classification" in c.get_server_metadata().extensions
    md = c.get_model_metadata("digits")
    assert md.inputs[0].datatype == "UINT8" and list(md.inputs[0].shape) == [-1, 8, 8, 1]
    x, y = digits_splits()["test"]
    inp = tg.InferInput("IMAGE", list(x[:5].shape), "UINT8")
    inp.set_data_from_numpy(x[:5])
    res = c.infer("digits", [inp], outputs=[tg.InferRequestedOutput("PROBABILITIES")])
    probs = res.as_numpy("PROBABILITIES")
    assert probs.shape == (5, 10) and np.allclose(probs.sum(-1), 1, atol=1e-5)
    res = c.infer("digits", [inp], outputs=[tg.InferRequestedOutput("PROBABILITIES", class_count=3)])
    top = res.as_numpy("PROBABILITIES")
    assert top.shape == (5, 3)
    score, index, label = top[0, 0].decode().split(":")
    assert int(index) == int(np.argmax(probs[0])) and label == str(index) and abs(float(score) - probs[0].max()) < 1e-4
    with pytest.raises(InferenceServerException, match="unknown task"):
        c.infer("nope", [inp])


def test_tritonclient_http(static_server):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    server, _ = static_server
    c = th.InferenceServerClient(server.http.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("digits")
    assert not c.is_model_ready("pending")
    assert c.get_model_metadata("digits")["outputs"][0]["shape"] == [-1, 10]
    x, _ = digits_splits()["test"]
    inp = th.InferInput("IMAGE", list(x[:4].shape), "UINT8")
    inp.set_data_from_numpy(x[:4])  # binary tensor extension (tritonclient's default)
    probs = c.infer("digits", [inp]).as_numpy("PROBABILITIES")
    assert probs.shape == (4, 10)
    res = c.infer("digits", [inp], outputs=[th.InferRequestedOutput("PROBABILITIES", class_count=2)])
    top = res.as_numpy("PROBABILITIES")
    assert top.shape == (4, 2) and int(top[1, 0].decode().split(":")[1]) == int(np.argmax(probs[1]))
    json_inp = th.InferInput("IMAGE", list(x[:2].shape), "UINT8")
    json_inp.set_data_from_numpy(x[:2], binary_data=False)
    out = c.infer("digits", [json_inp], outputs=[th.InferRequestedOutput("PROBABILITIES", binary_data=False)])
    np.testing.assert_allclose(out.as_numpy("PROBABILITIES"), probs[:2], rtol=1e-5)
    with pytest.raises(InferenceServerException, match="unknown task"):
        c.infer("nope", [inp])


def test_http_and_inference_protocol_timeouts_drop_expired_requests(static_server):
    """HTTP ``timeout_ms`` and the Open Inference Protocol's ``timeout`` parameter
    (microseconds; tritonclient's ``timeout=``) are deadlines like gRPC's: a request whose
    deadline passes before its images run gets 504 / DEADLINE_EXCEEDED, unrun; a generous one
    is answered."""
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    server, _ = static_server
    x, _ = digits_splits()["test"]
    url = server.http + "/v1/tasks/digits/classify"
    ok = httpx.post(url, params={"timeout_ms": "60000"}, content=_png(x[0]))
    assert ok.status_code == 200 and len(ok.json()["results"]) == 1
    late = httpx.post(url, params={"timeout_ms": "0.001"}, content=_png(x[0]))  # 1 us: gone while decoding
    assert late.status_code == 504 and "deadline passed" in late.json()["error"]
    for module, address in ((th, server.http.removeprefix("http://")), (tg, server.grpc)):
        c = module.InferenceServerClient(address)
        inp = module.InferInput("IMAGE", list(x[:3].shape), "UINT8")
        inp.set_data_from_numpy(x[:3])
        assert c.infer("digits", [inp], timeout=60_000_000).as_numpy("PROBABILITIES").shape == (3, 10)
        with pytest.raises(InferenceServerException, match="deadline passed") as err:
            c.infer("digits", [inp], timeout=1)
        assert "504" in str(err.value.status()) or "DEADLINE_EXCEEDED" in str(err.value.status())
        c.close()


def test_requests_beyond_max_concurrent_requests_are_refused_at_once_but_probes_answer(tmp_path):
    """With ``--max-concurrent-requests 1`` and a client keeping a large classify in progress
    back to back, other HTTP and gRPC requests are refused at once with 429 /
    RESOURCE_EXHAUSTED and a retry hint, while liveness, readiness, metrics and gRPC health
    answer; once it stops, requests are served again."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    data = tmp_path / "store"
    store = Store(data)
    arch, params = R.random_root(TINY, 0, seed=0)
    init_root(store, arch, params, {"mu": 0.3, "learning_rate": 0.05, "flip": False, "crop": False})
    add_task_arrays(store, "digits", digits_splits(), [str(i) for i in range(10)], source="test")
    Evolver(store, TINY_EVOLVER, progress=False).active_phase("digits")
    store.close()
    server = RunningServer(str(data), [*TINY_SERVE_ARGS, "--no-evolver", "--max-concurrent-requests", "1"])
    stop = threading.Event()

    def busy():  # 8192 images of 32x32 (conformed to 8x8) per call: the slot is nearly always taken
        big = pb.ClassifyRequest(task="digits", raw=pb.RawTensor(shape=[8192, 32, 32, 1], data=bytes(8192 * 1024)))
        with grpc.insecure_channel(server.grpc, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = pbgrpc.Mu2NetStub(ch)
            while not stop.is_set():
                try:
                    stub.Classify(big, timeout=60)
                except grpc.RpcError:
                    pass  # refused while the test's own request held the slot

    refused: dict[str, str] = {}
    thread = threading.Thread(target=busy, daemon=True)
    try:
        thread.start()
        deadline = time.time() + 120
        with grpc.insecure_channel(server.grpc) as ch:
            stub = pbgrpc.Mu2NetStub(ch)
            while time.time() < deadline and len(refused) < 2:
                r = httpx.get(server.http + "/v1/tasks")
                if r.status_code == 429:
                    assert r.headers["Retry-After"] == "1"
                    refused["http"] = r.json()["error"]
                try:
                    stub.ListTasks(pb.ListTasksRequest(), timeout=30)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                    assert dict(e.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
                    refused["grpc"] = e.details()
                for url in ("/v2/health/live", "/v2/health/ready", "/metrics"):  # never refused
                    assert httpx.get(server.http + url).status_code == 200, url
                health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                time.sleep(0.02)
        assert set(refused) == {"http", "grpc"}, refused
        assert all("1 requests are in progress, the most this server handles at once" in m for m in refused.values())
        stop.set()
        thread.join(120)
        assert [t["name"] for t in httpx.get(server.http + "/v1/tasks").json()["tasks"]] == ["digits"]
    finally:
        stop.set()
        assert server.stop() == 0, "".join(server.output[-30:])


def test_the_server_does_not_import_the_evolver(tmp_path):
    """`mu2net serve` (its flags parsed, a new store's root model made, a task added, every
    server module loaded) never imports the evolver: uploads are ingested by mu2net.ingest,
    the root is made by mu2net.root, and the evolver runs in its own process only."""
    code = f"""
import asyncio, sys
import mu2net.server as S
from mu2net import cli
async def fake_serve(*args, **kwargs):  # everything but the network and the evolver process
    import mu2net.server.app, mu2net.server.grpc_api, mu2net.server.http_api, mu2net.server.service
    return 0
S.serve = fake_serve
assert cli.main(["serve", "--data-dir", {str(tmp_path / "store")!r}, "--task", "digits=builtin:digits",
                 *{TINY_SERVE_ARGS!r}]) == 0
print(sorted(m for m in sys.modules if m.startswith("mu2net.evolver")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    store = Store(tmp_path / "store")  # the serve command really made a root and added the task
    try:
        assert store.root_path() is not None and [t.name for t in store.list_tasks()] == ["digits"]
    finally:
        store.close()


def test_health_reflection_metrics_page_and_system(static_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server, _ = static_server
    with grpc.insecure_channel(server.grpc) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="mu2net.v1.Mu2Net"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"mu2net.v1.Mu2Net", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        tasks = pbgrpc.Mu2NetStub(ch).ListTasks(pb.ListTasksRequest())
        assert [t.name for t in tasks.tasks] == ["digits", "pending"] and tasks.tasks[1].state == "queued"
    metrics = httpx.get(server.http + "/metrics").text
    for name in ("mu2net_requests_total", "mu2net_request_latency_seconds_bucket", "mu2net_batch_size_bucket",
                 "mu2net_system_version", 'mu2net_tasks{state="serving"} 1.0', "mu2net_evolver_task_iterations",
                 'mu2net_requests_in_flight{api="http"} 1.0',  # this very scrape
                 "mu2net_batcher_queued_images 0.0", "mu2net_batcher_seconds_per_image", "mu2net_batch_paths_bucket",
                 'mu2net_function_traces{function="grouped_trunk"}'):
        assert name in metrics, name
    # the server compiled its served path's forward (every batch bucket, at load), and counts it
    compiled = re.search(r'mu2net_function_traces\{function="probabilities"\} (\d+)', metrics)
    assert compiled and int(compiled.group(1)) >= 1, metrics[-2000:]
    page = httpx.get(server.http + "/")
    assert page.status_code == 200 and "<svg" in page.text and "digits" in page.text
    system = httpx.get(server.http + "/v1/system").json()
    assert system["total_params"] > 0 and system["tasks"]["digits"]["activated_params"] > 0


def _png(v):
    """A 6x6 gray PNG of value ``v``, or the PNG of an image array ``[H,W,1]``."""
    buf = io.BytesIO()
    pixels = np.asarray(v, np.uint8)
    Image.fromarray(pixels[..., 0] if pixels.ndim == 3 else np.full((6, 6), v, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_server_bounds_the_xla_compute_pool(static_server, tmp_path):
    """``mu2net serve`` sizes XLA's CPU compute pool (default: CPUs - 1, at least 1) and
    rejects a negative size. XLA names its pool threads ``tf_XLAEigen`` (jaxlib 0.10.2)."""
    from mu2net.server.compute import default_compute_threads

    server, _ = static_server
    task_dir = f"/proc/{server.proc.pid}/task"
    names = [open(f"{task_dir}/{t}/comm").read().strip() for t in os.listdir(task_dir)]
    assert names.count("tf_XLAEigen") == default_compute_threads(), names
    with pytest.raises(RuntimeError, match=r"argument --compute-threads: -1; allowed: 0 \(one per CPU\) or a positive count"):
        RunningServer(str(tmp_path / "store"), ["--no-evolver", "--compute-threads", "-1"])
    assert not (tmp_path / "store").exists()  # rejected before the store was created


@pytest.mark.parametrize("kind", [c.kind for c in hostile.CASES])
def test_hostile_inputs_get_their_client_error_and_change_nothing(static_server, kind):
    """Every case of the hostile-input catalogue (benchmarks/hostile.py: uploads, classify,
    the Open Inference Protocol, gRPC, admin routes) gets its 4xx / gRPC client status and a
    message naming the problem; the store's tasks, version and files are unchanged and the
    server still classifies."""
    server, store = static_server
    case = next(c for c in hostile.CASES if c.kind == kind)
    spool = [p for p in store.data_dir.iterdir() if p.name.startswith("uploads-")]
    assert len(spool) == 1
    row = hostile.run_case(case, hostile.Target(server.http, server.grpc), store, spool[0])
    assert row["passed"], row
    # where a "../../evil.png" member would land from the server's extraction directory (a system
    # temporary directory) or from its data directory
    import pathlib
    import tempfile
    tmp = pathlib.Path(tempfile.gettempdir())
    assert not [p for p in (tmp / "evil.png", tmp.parent / "evil.png", pathlib.Path("/etc/evil.png")) if p.exists()]
    assert not list(pathlib.Path(store.data_dir).rglob("evil*"))


def test_small_and_macos_uploads_are_accepted(static_server):
    """2 classes x 30 images (a test split of 6) and a zip made on macOS (one top folder,
    ``__MACOSX/`` and ``.DS_Store`` beside the images) become tasks with the right classes;
    the small task trains and serves."""
    server, store = static_server
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for label in ("cat", "dog"):
            for i in range(30):
                zf.writestr(f"pets/{label}/{i}.png", _png(i + (100 if label == "dog" else 0)))
                zf.writestr(f"__MACOSX/pets/{label}/._{i}.png", b"\x00\x05\x16\x07")
            zf.writestr(f"pets/{label}/.DS_Store", b"Bud1")
    try:
        r = httpx.post(server.http + "/v1/tasks", params={"name": "pets"}, content=buf.getvalue(),
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        assert r.status_code == 202, r.text
        task = r.json()
        assert task["labels"] == ["cat", "dog"] and sum(task["num_examples"].values()) == 60
        # it trains (this server has no evolver: the test process runs one task iteration on
        # the same store) and serves: a path beating chance on its small validation split is
        # published, and the server answers with it
        Evolver(store, TINY_EVOLVER, progress=False).active_phase("pets")
        best = store.best_path("pets")  # published only if it beat chance on validation
        assert best is not None
        version = store.system_version()
        deadline = time.time() + 60
        while time.time() < deadline:  # the server has loaded the phase's last publish
            answer = httpx.post(server.http + "/v1/tasks/pets/classify", content=_png(110))
            if answer.status_code == 200 and answer.json()["system_version"] >= version:
                break
            time.sleep(0.2)
        assert answer.status_code == 200 and answer.json()["path_id"] == best.id, answer.text
        assert answer.json()["results"][0]["labels"][0] in ("cat", "dog")
    finally:
        httpx.delete(server.http + "/v1/tasks/pets", headers={"Authorization": f"Bearer {TOKEN}"})


def test_an_unexpected_error_is_a_500_with_a_request_id_and_no_internals(tmp_path, caplog):
    import asyncio

    from mu2net.server.http_api import build_app

    class Broken:
        metrics = None

        @contextlib.contextmanager
        def request_slot(self, method):
            yield

        def list_tasks(self):
            raise RuntimeError("secret internal detail /var/lib/thing")

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_app(Broken(), str(tmp_path)))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/v1/tasks")

    r = asyncio.run(get())
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "internal server error" and re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
    assert "secret" not in r.text
    assert body["request_id"] in caplog.text and "secret internal detail" in caplog.text  # logged for the operator


def test_request_errors_map_to_the_right_codes(static_server):
    server, store = static_server
    x, _ = digits_splits()["test"]
    with Client(server.grpc, server.http, token=TOKEN, retries=0) as client:
        with pytest.raises(NotFoundError, match="'nope'"):
            client.classify("nope", x[:1])
        with pytest.raises(NotReadyError, match="no served path"):
            client.classify("pending", x[:1])
        with pytest.raises(InvalidArgumentError, match="not a decodable image"):
            client.classify("digits", [b"definitely not an image"])
        with pytest.raises(InvalidArgumentError, match="top_k=11"):
            client.classify("digits", x[:1], top_k=11)
        with pytest.raises(TooLargeError):
            client.classify("digits", np.zeros((1, 1024, 1100, 1), np.uint8))  # > 1 MiB message
        with pytest.raises(AlreadyExistsError, match="'digits' already exists"):
            client.upload("digits", _npz_dict(digits_splits()))
        with pytest.raises(NotFoundError):
            client.task("nope")
    with Client(server.grpc, server.http, retries=0) as anonymous:
        with pytest.raises(AuthenticationError):
            anonymous.upload("x", _npz_dict(digits_splits()))
        with pytest.raises(AuthenticationError):
            anonymous.delete("digits")
    # the raw gRPC and HTTP answers of these and more: test_hostile_inputs_get_their_client_error_and_change_nothing
    assert httpx.get(server.http + "/v1/tasks/nope").status_code == 404
    assert httpx.get(server.http + "/v2/models/pending/ready").status_code == 503
    assert "error" in httpx.get(server.http + "/v2/models/nope").json()
    assert [t.name for t in store.list_tasks()] == ["digits", "pending"]


def test_hot_swap_under_load(static_server):
    """Concurrent classify calls while new versions are published: zero failures, and every
    answer names a version that was published."""
    server, store = static_server
    x, _ = digits_splits()["test"]
    start = store.system_version()
    published = {start}
    stop = threading.Event()
    answers, failures = [], []

    def load(seed):
        rng = np.random.default_rng(seed)
        with Client(server.grpc, server.http, retries=0) as client:
            while not stop.is_set():
                n = int(rng.integers(1, 6))
                try:
                    r = client.classify("digits", x[:n])
                    answers.append(r.system_version)
                    assert len(r.results) == n
                except Exception as e:  # noqa: BLE001 - every failure is recorded
                    failures.append(repr(e))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load, s) for s in range(4)]
        evolver = Evolver(store, TINY_EVOLVER, progress=False)
        for _ in range(2):
            evolver.active_phase("digits")
        # every improvement is published, mid-phase too: each version in the store's history
        published |= {h["system_version"] for h in store.history("digits")}
        import time

        deadline = time.time() + 120
        while time.time() < deadline and (not answers or answers[-1] != store.system_version()):
            time.sleep(0.2)
        stop.set()
        for f in futures:
            f.result()
    assert not failures, failures[:3]
    assert len(answers) > 20
    assert set(answers) <= published, (set(answers), published)
    assert answers[-1] == store.system_version()  # the newest version was swapped in
    # the phases published (a phase that finds nothing better publishes nothing: then nothing was
    # swapped and the test would prove nothing), and answers came from before and after a swap
    assert store.system_version() > start and len(set(answers)) >= 2, (start, sorted(set(answers)))


def test_async_client(static_server):
    import asyncio

    from mu2net_client import AsyncClient

    server, _ = static_server
    x, _ = digits_splits()["test"]

    async def main():
        async with AsyncClient(server.grpc, server.http) as client:
            tasks = await client.tasks()
            assert [t.name for t in tasks] == ["digits", "pending"]
            task = await client.wait_until_serving("digits", timeout=10)
            result = await client.classify("digits", x[:3], top_k=2)
            assert len(result) == 3 and result.system_version == task.system_version
            with pytest.raises(NotFoundError):
                await client.classify("nope", x[:1])
            with pytest.raises(NotReadyError):
                await client.classify("pending", x[:1])
            answers = dict([a async for a in client.classify_stream([("digits", x[:2]), ("nope", x[:1])], top_k=2)])
            assert sorted(answers) == [0, 1] and isinstance(answers[1], NotFoundError)
            assert len(answers[0]) == 2 and answers[0].system_version == task.system_version

    asyncio.run(main())


def test_classify_stream_answers_each_request_as_classify_would(static_server):
    """ClassifyStream: any tasks over one call, each request answered (in completion order,
    its index as id) with what Classify answers it, an error answering that request only."""
    from mu2net_client import ClassifyResult

    server, _ = static_server
    x, _ = digits_splits()["test"]
    with Client(server.grpc, server.http, token=TOKEN, retries=0) as client:
        requests = [("digits", x[i:i + 1]) for i in range(20)]
        requests[5], requests[9], requests[12] = ("nope", x[:1]), ("pending", x[:1]), ("digits", [b"not an image"])
        answers = dict(client.classify_stream(requests, top_k=3))
        assert sorted(answers) == list(range(20))
        assert isinstance(answers[5], NotFoundError) and "'nope'" in str(answers[5])
        assert isinstance(answers[9], NotReadyError) and "no served path" in str(answers[9])
        assert isinstance(answers[12], InvalidArgumentError) and "not a decodable image" in str(answers[12])
        for i in sorted(set(range(20)) - {5, 9, 12}):
            unary = client.classify("digits", x[i:i + 1], top_k=3)
            got = answers[i]
            assert isinstance(got, ClassifyResult) and got.system_version == unary.system_version
            assert got.results[0].label_ids[0] == unary.results[0].label_ids[0]
            # (batched with other requests: the same row in another batch size may differ in the last bit)
            np.testing.assert_allclose(got.results[0].scores, unary.results[0].scores, rtol=1e-5)
        # more requests than the server keeps in progress per stream (STREAM_WINDOW): flow control
        many = list(client.classify_stream([("digits", x[i % 50:i % 50 + 1]) for i in range(600)]))
        assert sorted(i for i, _ in many) == list(range(600))
        assert all(isinstance(r, ClassifyResult) and len(r) == 1 for _, r in many)
        # images the SDK cannot send end the stream after the answers to the requests before them
        got_before = []
        with pytest.raises(InvalidArgumentError, match="image 0 has type object"):
            for answer in client.classify_stream([("digits", x[:1]), ("digits", [object()])]):
                got_before.append(answer)
        assert [i for i, _ in got_before] == [0]
        # a message over --max-message-bytes ends the call (gRPC's own limit), as it fails a Classify
        with pytest.raises(TooLargeError):
            list(client.classify_stream([("digits", np.zeros((1, 1024, 1100, 1), np.uint8))]))


def _run_cli(*args):
    """``mu2net ARGS`` as a user runs it, in a subprocess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mu2net.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_client_commands(static_server, tmp_path):
    import json

    server, store = static_server
    common = ["--grpc", server.grpc, "--http", server.http]

    cli = _run_cli

    tasks = cli("tasks", *common, "--json")
    assert tasks.returncode == 0, tasks.stderr[-2000:]
    assert [t["name"] for t in json.loads(tasks.stdout)] == ["digits", "pending"]
    x, _ = digits_splits()["test"]
    png = tmp_path / "seven.png"
    Image.fromarray(x[0][..., 0]).save(png)
    out = cli("classify", "digits", str(png), "--top-k", "2", *common)
    assert out.returncode == 0 and "system version" in out.stdout, out.stderr[-2000:]
    status = cli("status", *common, "--json")
    assert json.loads(status.stdout)["tasks"] == {"serving": 1, "queued": 1}
    s = digits_splits()
    np.savez(tmp_path / "up.npz", **_npz_dict(s))
    denied = cli("upload", "cli_task", str(tmp_path / "up.npz"), *common)
    assert denied.returncode == 1 and "token" in denied.stderr
    up = cli("upload", "cli_task", str(tmp_path / "up.npz"), "--token", TOKEN, *common)
    assert up.returncode == 0 and "queued" in up.stdout, up.stderr[-2000:]
    missing = cli("classify", "nope", str(png), *common)
    assert missing.returncode == 1 and "unknown task 'nope'" in missing.stderr
    with Client(server.grpc, server.http, token=TOKEN) as client:
        assert client.delete("cli_task") == {"deleted": "cli_task", "requeued": []}
        with pytest.raises(NotFoundError):
            client.task("cli_task")


def test_sigterm_drains_in_flight_requests(tmp_path):
    """A classify call in flight when SIGTERM arrives still completes; the server exits 0."""
    import signal
    import time

    store = Store(tmp_path / "store")
    arch, params = R.random_root(TINY, 0, seed=0)
    init_root(store, arch, params, {"flip": False, "crop": False})
    add_task_arrays(store, "digits", digits_splits(), [str(i) for i in range(10)], source="test")
    Evolver(store, TINY_EVOLVER, progress=False).active_phase("digits")
    store.close()
    limit = str(256 << 20)
    server = RunningServer(str(tmp_path / "store"), [*TINY_SERVE_ARGS, "--no-evolver", "--max-message-bytes", limit])
    # 8192 copies of one small PNG: a few MB on the wire (received at once), while decoding
    # and resizing them keeps the server busy for over a second
    gradient = (np.add.outer(np.arange(160), np.arange(160)) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, format="PNG")
    big = [buf.getvalue()] * 8192
    outcome = {}
    started = threading.Event()

    def call():
        with Client(server.grpc, server.http, retries=0, timeout=120, max_message_bytes=256 << 20) as client:
            client.classify("digits", big[:64])  # compiles the 64-image chunk shape
            started.set()
            t0 = time.perf_counter()
            try:
                outcome["result"] = client.classify("digits", big)
            except Exception as e:  # noqa: BLE001 - recorded and asserted below
                outcome["error"] = repr(e)
            outcome["finished"] = time.perf_counter()
            outcome["seconds"] = outcome["finished"] - t0

    thread = threading.Thread(target=call)
    thread.start()
    assert started.wait(120)
    deadline = time.monotonic() + 60
    while 'mu2net_requests_in_flight{api="grpc"} 1.0' not in httpx.get(server.http + "/metrics").text:
        assert time.monotonic() < deadline and thread.is_alive(), "the big request was never seen in flight"
        time.sleep(0.01)
    sigterm_at = time.perf_counter()  # the big request is in the server (decoding 8192 images takes > 1 s)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(120)
    code = server.stop()
    time.sleep(0.5)
    assert code == 0, f"exit {code}: " + "".join(server.output[-40:])
    assert "error" not in outcome, outcome.get("error")
    assert outcome["finished"] > sigterm_at, f"the request took {outcome['seconds']:.2f}s and ended before SIGTERM"
    assert len(outcome["result"]) == 8192


def _caught_up(server, store, timeout=60):
    """Waits until the server serves the store's newest version (hot-swap is asynchronous)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if httpx.get(server.http + "/v1/system").json()["system_version"] == store.system_version():
            return
        time.sleep(0.2)
    raise AssertionError(f"the server did not load system version {store.system_version()} in {timeout}s")


def test_task_resource_has_history_evolution_and_evolver_activity(static_server):
    """HTTP and gRPC task resources carry every publish of a new best path (the last one is
    the served path), when it last improved, the pause state and the evolver's activity."""
    import time

    server, store = static_server
    _caught_up(server, store)
    store.set_evolver_status({})  # the fixture's evolver ran in this process and left its status
    view = httpx.get(server.http + "/v1/tasks/digits").json()
    history = store.history("digits")
    assert history and [p["system_version"] for p in view["history"]] == [h["system_version"] for h in history]
    last = view["history"][-1]
    assert set(last) == {"system_version", "time", "validation_accuracy", "test_accuracy"}
    assert last["system_version"] == view["system_version"] == history[-1]["system_version"]
    assert history[-1]["path_id"] == view["path_id"]
    assert last["validation_accuracy"] == view["metrics"]["validation_accuracy"]
    assert last["test_accuracy"] == view["metrics"]["test_accuracy"]
    assert abs(view["improved_at"] - last["time"]) < 5 and view["improved_at"] <= time.time()
    assert view["evolution"] == {"paused": False, "stale_iterations": 0, "pinned": False} and view["evolver"] is None
    pending = httpx.get(server.http + "/v1/tasks/pending").json()
    assert pending["history"] == [] and pending["improved_at"] is None
    with grpc.insecure_channel(server.grpc) as ch:
        task = pbgrpc.Mu2NetStub(ch).GetTask(pb.GetTaskRequest(name="digits"))
    assert [p.system_version for p in task.history] == [p["system_version"] for p in view["history"]]
    assert task.history[-1].validation_accuracy == last["validation_accuracy"]
    assert task.history[-1].test_accuracy == last["test_accuracy"] == task.test_accuracy
    assert task.history[-1].system_version == task.system_version and task.history[-1].time == last["time"]
    assert task.improved_at == view["improved_at"] and not task.paused and not task.HasField("evolver")
    with Client(server.grpc, server.http) as client:
        sdk = client.task("digits")
    assert sdk.history[-1].test_accuracy == last["test_accuracy"] and sdk.improved_at == view["improved_at"]

    # the evolver's status shows on the task it trains (and in /v1/system), not on others
    status = {"state": "training", "task": "digits", "iteration": 3, "generation": 2, "generations": 8,
              "children_running": 2, "phase": "evolving", "started": time.time() - 9, "updated": time.time() - 3,
              "pid": 1}
    store.set_evolver_status(status)
    try:
        assert httpx.get(server.http + "/v1/tasks/digits").json()["evolver"] == status
        listed = {t["name"]: t for t in httpx.get(server.http + "/v1/tasks").json()["tasks"]}
        assert listed["digits"]["evolver"] == status and listed["pending"]["evolver"] is None
        assert listed["digits"]["history"] == view["history"]
        assert httpx.get(server.http + "/v1/system").json()["evolver"] == status
        with grpc.insecure_channel(server.grpc) as ch:
            stub = pbgrpc.Mu2NetStub(ch)
            ev = stub.GetTask(pb.GetTaskRequest(name="digits")).evolver
            assert not stub.GetTask(pb.GetTaskRequest(name="pending")).HasField("evolver")
        assert (ev.task, ev.iteration, ev.generation, ev.generations, ev.children_running, ev.phase) == \
            ("digits", 3, 2, 8, 2, "evolving")
        assert ev.updated == status["updated"]
        page = httpx.get(server.http + "/").text
        assert re.search(r"evolver: training digits \(evolving\), iteration 3, generation 2/8, 2 children running, "
                         r"updated [3-9] s ago", page), page
        assert "<th>last improvement</th><th>paused</th>" in page
        assert page.count("<polyline") == 2 and "minutes since first answer" in page  # digits: val + test
        store.set_evolver_status({**status, "state": "idle", "task": None})
        assert httpx.get(server.http + "/v1/tasks/digits").json()["evolver"] is None
        assert re.search(r"evolver: idle, updated [3-9] s ago", httpx.get(server.http + "/").text)
        store.set_evolver_status({**status, "task": "<b>x</b>"})  # text on the page is escaped
        page = httpx.get(server.http + "/").text
        assert "training &lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    finally:
        store.set_evolver_status({})


def test_evolve_wakes_a_paused_task(static_server):
    server, store = static_server
    store.set_evolution("digits", stale_iterations=2, paused_version=5)
    try:
        view = httpx.get(server.http + "/v1/tasks/digits").json()
        assert view["evolution"] == {"paused": True, "stale_iterations": 2, "pinned": False}
        with grpc.insecure_channel(server.grpc) as ch:
            task = pbgrpc.Mu2NetStub(ch).GetTask(pb.GetTaskRequest(name="digits"))
        assert task.paused and task.stale_iterations == 2
        r = httpx.post(server.http + "/v1/tasks/digits/evolve")
        assert r.status_code == 401 and "admin bearer token" in r.json()["error"]
        assert store.get_task("digits").paused_version == 5
        with Client(server.grpc, server.http, retries=0) as anonymous:
            with pytest.raises(AuthenticationError):
                anonymous.evolve("digits")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = httpx.post(server.http + "/v1/tasks/digits/evolve", headers=auth)
        assert r.status_code == 202, r.text
        assert r.json()["name"] == "digits" and r.json()["evolution"] == {"paused": False, "stale_iterations": 0, "pinned": False}
        record = store.get_task("digits")
        assert record.paused_version is None and record.stale_iterations == 0
        r = httpx.post(server.http + "/v1/tasks/nope/evolve", headers=auth)
        assert r.status_code == 404 and "'nope'" in r.json()["error"]
        store.set_evolution("digits", stale_iterations=1, paused_version=7)
        with Client(server.grpc, server.http, token=TOKEN, retries=0) as client:
            task = client.evolve("digits")
            assert task.name == "digits" and not task.paused and task.stale_iterations == 0
            with pytest.raises(NotFoundError):
                client.evolve("nope")
        assert store.get_task("digits").paused_version is None
    finally:
        store.set_evolution("digits", stale_iterations=0, paused_version=None)


def test_wait_until_an_accuracy(static_server):
    import asyncio

    from mu2net_client import AsyncClient
    from mu2net_client import TimeoutError as SdkTimeoutError

    server, _ = static_server
    with Client(server.grpc, server.http) as client:
        current = client.task("digits").metrics
        assert current["test_accuracy"] < 1.0, "the tiny model cannot be perfect"
        task = client.wait_until("digits", current["test_accuracy"], timeout=5, progress=False)
        assert task.state == "serving" and task.metrics["test_accuracy"] >= current["test_accuracy"]
        task = client.wait_until("digits", current["validation_accuracy"], metric="validation_accuracy", timeout=5,
                                 progress=False)
        assert task.metrics["validation_accuracy"] >= current["validation_accuracy"]
        last = re.escape(f"has test_accuracy {current['test_accuracy']:.4f} after 1s; target 1.0")
        with pytest.raises(SdkTimeoutError, match=last):
            client.wait_until("digits", 1.0, timeout=1, progress=False)
        with pytest.raises(SdkTimeoutError, match=r"'pending' \(queued\) has test_accuracy none yet"):
            client.wait_until("pending", 0.5, timeout=0.5, poll=0.1, progress=False)
        with pytest.raises(NotFoundError):
            client.wait_until("nope", 0.5, timeout=1, progress=False)

    async def main():
        async with AsyncClient(server.grpc, server.http) as client:
            task = await client.wait_until("digits", current["test_accuracy"], timeout=5, progress=False)
            assert task.metrics["test_accuracy"] >= current["test_accuracy"]
            with pytest.raises(SdkTimeoutError, match=r"target 1\.0"):
                await client.wait_until("digits", 1.0, timeout=1, progress=False)
            with pytest.raises(InvalidArgumentError, match="allowed: 'test_accuracy', 'validation_accuracy'"):
                await client.wait_until("digits", 0.5, metric="accuracy")

    asyncio.run(main())


def test_cli_status_wake_and_wait_log_no_http_requests(static_server, tmp_path):
    """Client commands print results without httpx's INFO line per request (unless --verbose)."""
    import json
    import time

    server, store = static_server
    common = ["--grpc", server.grpc, "--http", server.http]

    cli = _run_cli

    store.set_evolver_status({})
    status = cli("status", *common)
    assert status.returncode == 0, status.stderr[-2000:]
    assert "HTTP Request" not in status.stdout + status.stderr
    assert "evolver: no status yet" in status.stdout
    lines = {line.split()[0]: line for line in status.stdout.splitlines() if line.startswith("  ")}
    acc = httpx.get(server.http + "/v1/tasks/digits").json()["metrics"]["test_accuracy"]
    assert f"serving   test acc {acc:.4f}" in lines["digits"] and "ago" in lines["digits"]
    assert "queued" in lines["pending"] and "never improved" in lines["pending"]
    verbose = cli("status", *common, "--verbose")
    assert verbose.returncode == 0 and "HTTP Request: GET" in verbose.stderr, verbose.stderr[-2000:]

    store.set_evolution("digits", stale_iterations=3, paused_version=4)
    try:
        doc = json.loads(cli("status", *common, "--json").stdout)
        digits = next(t for t in doc["per_task"] if t["name"] == "digits")
        assert digits["paused"] and digits["stale_iterations"] == 3 and digits["test_accuracy"] == acc
        assert 0 <= digits["seconds_since_improvement"] <= time.time() - digits["improved_at"] + 1
        assert doc["evolver"] == {} and doc["tasks"] == {"serving": 1, "queued": 1}
        assert "paused" in cli("status", *common).stdout.splitlines()[-2]  # digits' row (pending is last)
        denied = cli("wake", "digits", *common)
        assert denied.returncode == 1 and "token" in denied.stderr
        woke = cli("wake", "digits", "--token", TOKEN, *common)
        assert woke.returncode == 0, woke.stderr[-2000:]
        assert woke.stdout.startswith("task digits: serving, evolving") and "HTTP Request" not in woke.stderr
        assert store.get_task("digits").paused_version is None
        missing = cli("wake", "nope", "--token", TOKEN, *common)
        assert missing.returncode == 1 and "unknown task 'nope'" in missing.stderr
    finally:
        store.set_evolution("digits", stale_iterations=0, paused_version=None)

    # --wait --accuracy polls (no evolver here: the new task never answers) until --timeout
    s = digits_splits()
    np.savez(tmp_path / "up.npz", **_npz_dict(s))
    try:
        bad = cli("upload", "cli_wait", str(tmp_path / "up.npz"), "--accuracy", "1.5", *common)
        assert bad.returncode == 2 and "allowed: a fraction in [0, 1]" in bad.stderr
        waited = cli("upload", "cli_wait", str(tmp_path / "up.npz"), "--wait", "--accuracy", "0.5", "--timeout", "2",
                     "--token", TOKEN, *common)
        assert waited.returncode == 1 and "'cli_wait' still queued after 2.0s" in waited.stderr, waited.stderr[-2000:]
        assert "HTTP Request" not in waited.stderr and waited.stdout == ""
    finally:
        with Client(server.grpc, server.http, token=TOKEN) as client:
            client.delete("cli_wait")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_the_evolver_dies_with_a_killed_server_and_a_store_has_one_evolver(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from mu2net.store import EvolverRunning, evolver_lock

    data = str(tmp_path / "store")
    server = RunningServer(data, TINY_SERVE_ARGS)
    try:
        deadline = time.time() + 60
        while not (started := _children(server.proc.pid)) and time.time() < deadline:
            time.sleep(0.2)
        assert started, "the server started no evolver process within 60 s"
        deadline = time.time() + 60  # the evolver takes the store's lock once it has started
        while time.time() < deadline:
            try:
                evolver_lock(data).release()
            except EvolverRunning:
                break
            time.sleep(0.2)
        with pytest.raises(EvolverRunning, match="another evolver process is running"):
            evolver_lock(data)
        # the evolver that holds the lock (a probe above may have made an earlier one exit and restart)
        deadline = time.time() + 30
        while len(kids := _children(server.proc.pid)) != 1 and time.time() < deadline:
            time.sleep(0.2)
        assert len(kids) == 1, f"the server runs {len(kids)} evolver processes after 30 s, not 1: {kids}"
        (evolver,) = kids
        # a second evolver on the same store refuses with a clear error
        second = subprocess.run([sys.executable, "-m", "mu2net.server.evolver_process", "--data-dir", data],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 3 and "another evolver process is running" in second.stderr, second.stderr
        # every evolver the server runs now (it may have started another since: one that ended
        # its iterations, or one a probe above made exit, is started again)
        evolvers = set(_children(server.proc.pid)) | {evolver}
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)
        deadline = time.time() + 30
        while any(_alive(p) for p in evolvers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in evolvers), "an evolver outlived its SIGKILLed server"
        evolver_lock(data).release()  # its lock went with it: a restarted server can evolve
    finally:
        server.stop()


def test_a_raw_tensor_of_another_shape_is_conformed_like_an_encoded_image(static_server):
    """A raw tensor not at the task's stored shape is resized on the host, exactly as an encoded
    image of the same pixels is, so no new input shape reaches the compiled forward pass."""
    server, _ = static_server
    x, _ = digits_splits()["test"]
    big = np.repeat(np.repeat(x[:3], 3, axis=1), 3, axis=2)  # 24x24x1 instead of 8x8x1
    rgb = np.repeat(big, 3, axis=-1)
    pngs = []
    for img in big:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0]).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    with Client(server.grpc, server.http, retries=0) as client:
        from_raw = client.classify("digits", big, top_k=3)
        from_rgb = client.classify("digits", rgb, top_k=3)
        from_png = client.classify("digits", pngs, top_k=3)
    for a, b in ((from_raw, from_png), (from_rgb, from_png)):
        for ra, rb in zip(a, b):
            assert ra.labels == rb.labels and np.array_equal(ra.scores, rb.scores)


def _certificates(d):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    import subprocess

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=mu2net test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{name}.ext").write_text(ext)
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return {k: str(d / f"{k}.pem") for k in ("ca", "server", "client")} | {
        "server_key": str(d / "server.key"), "client_key": str(d / "client.key")}


def test_tls_with_client_certificates_for_grpc_and_https(tmp_path):
    import ssl

    from mu2net_client import TransportError

    certs = _certificates(tmp_path)
    server = RunningServer(str(tmp_path / "store"), [*TINY_SERVE_ARGS, "--no-evolver", "--tls-cert", certs["server"],
                                                     "--tls-key", certs["server_key"],
                                                     "--tls-client-ca", certs["ca"]])
    try:
        assert server.http.startswith("https://")
        client_cert = (certs["client"], certs["client_key"])
        with Client(server.grpc, server.http, tls_ca=certs["ca"], tls_client_cert=client_cert, retries=0) as client:
            assert client.tasks() == []  # HTTPS, verified both ways
            with pytest.raises(NotFoundError, match="'nope'"):  # gRPC over TLS reached the service
                client.classify("nope", np.zeros((1, 8, 8, 1), np.uint8))
        with Client(server.grpc, server.http, tls_ca=certs["ca"], retries=0, timeout=5) as no_cert:
            with pytest.raises(TransportError):  # the server requires a client certificate
                no_cert.classify("nope", np.zeros((1, 8, 8, 1), np.uint8))
        with Client(server.grpc, server.http.replace("https", "http"), retries=0, timeout=5) as plain:
            with pytest.raises(TransportError):
                plain.classify("nope", np.zeros((1, 8, 8, 1), np.uint8))
        # HTTPS refuses a client without a certificate too (the TLS handshake fails)
        with pytest.raises(httpx.TransportError):  # in the handshake, or at the first read (TLS 1.3)
            httpx.get(f"{server.http}/v1/tasks", verify=ssl.create_default_context(cafile=certs["ca"]))
    finally:
        assert server.stop() == 0, "".join(server.output[-30:])
    # without --tls-client-ca: TLS with server authentication only; any client with the CA connects
    one_way = RunningServer(str(tmp_path / "store"), [*TINY_SERVE_ARGS, "--no-evolver", "--tls-cert", certs["server"],
                                                      "--tls-key", certs["server_key"]])
    try:
        with Client(one_way.grpc, one_way.http, tls_ca=certs["ca"], retries=0, timeout=5) as client:
            assert client.tasks() == []
            with pytest.raises(NotFoundError, match="'nope'"):
                client.classify("nope", np.zeros((1, 8, 8, 1), np.uint8))
        trusted = ssl.create_default_context(cafile=certs["ca"])
        assert httpx.get(f"{one_way.http}/v1/tasks", verify=trusted).json() == {"tasks": []}
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA refuses the server
            httpx.get(f"{one_way.http}/v1/tasks")
    finally:
        assert one_way.stop() == 0, "".join(one_way.output[-30:])
    with pytest.raises(RuntimeError, match="TLS needs both --tls-cert and --tls-key"):
        RunningServer(str(tmp_path / "store2"), ["--no-evolver", "--tls-cert", certs["server"]])


def test_private_tasks_are_invisible_without_their_groups_read_token_or_the_admin_token(tmp_path):
    from mu2net_client import Client, NotFoundError

    data = tmp_path / "store"
    store = Store(data)
    arch, params = R.random_root(TINY, 0, seed=0)
    init_root(store, arch, params, {"mu": 0.3, "learning_rate": 0.05, "flip": False, "crop": False})
    add_task_arrays(store, "public", digits_splits(), [str(i) for i in range(10)], source="test")
    add_task_arrays(store, "secret", digits_splits(lambda y: y % 2), ["even", "odd"], source="test", private=True,
                    acl_group="team")
    ev = Evolver(store, TINY_EVOLVER, progress=False)
    ev.active_phase("public")
    ev.active_phase("secret")
    store.set_evolver_status({"state": "training", "task": "secret", "iteration": 2, "generation": 1,
                              "generations": 2, "children_running": 1, "updated": time.time()})
    store.close()
    server = RunningServer(str(data), [*TINY_SERVE_ARGS, "--no-evolver", "--admin-token", TOKEN,
                                       "--read-token", "team=team-token", "--read-token", "other=other-token"])
    x, _ = digits_splits()["test"]
    try:
        for token in (None, "wrong", "other-token"):  # not admin, not the group's read token
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            listed = httpx.get(f"{server.http}/v1/tasks", headers=headers).json()["tasks"]
            assert [t["name"] for t in listed] == ["public"], token
            for url in ("/v1/tasks/secret", "/v2/models/secret", "/v2/models/secret/ready"):
                r = httpx.get(f"{server.http}{url}", headers=headers)
                assert r.status_code == 404 and r.json()["error"] == "unknown task 'secret'; known tasks: ['public']", \
                    (token, url, r.text)
            r = httpx.get(f"{server.http}/v1/tasks/nope", headers=headers)  # the same answer as for a name unused
            assert r.status_code == 404 and r.json()["error"] == "unknown task 'nope'; known tasks: ['public']"
            system = httpx.get(f"{server.http}/v1/system", headers=headers).json()
            assert set(system["tasks"]) == {"public"} and "secret" not in json.dumps(system)
            page = httpx.get(f"{server.http}/", headers=headers).text
            assert "secret" not in page and "None" not in page
            assert re.search(r"evolver: training a private task you cannot see, updated \d+ s ago", page), page
            with Client(server.grpc, server.http, token=token) as client:
                with pytest.raises(NotFoundError, match="unknown task 'secret'"):
                    client.classify("secret", x[:2])
                assert client.classify("public", x[:2]).system_version >= 2
            # HTTP classify and Open Inference Protocol inference (REST and gRPC) hide it the same way
            r = httpx.post(f"{server.http}/v1/tasks/secret/classify", headers=headers, content=_png(x[0]))
            assert r.status_code == 404 and "unknown task 'secret'" in r.json()["error"], (token, r.text)
            infer = {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 8, 8, 1],
                                 "data": x[0].ravel().tolist()}]}
            r = httpx.post(f"{server.http}/v2/models/secret/infer", headers=headers, json=infer)
            assert r.status_code == 404 and "unknown task 'secret'" in r.json()["error"], (token, r.text)
            assert httpx.post(f"{server.http}/v2/models/public/infer", headers=headers, json=infer).status_code == 200
            import tritonclient.grpc as tg
            from tritonclient.utils import InferenceServerException

            triton = tg.InferenceServerClient(server.grpc)
            inp = tg.InferInput("IMAGE", [1, 8, 8, 1], "UINT8")
            inp.set_data_from_numpy(x[:1])
            with pytest.raises(InferenceServerException, match="unknown task 'secret'"):
                triton.infer("secret", [inp], headers={"authorization": f"Bearer {token}"} if token else None)
            with pytest.raises(InferenceServerException, match="unknown task 'secret'"):
                triton.is_model_ready("secret", headers={"authorization": f"Bearer {token}"} if token else None)
            triton.close()
            with grpc.insecure_channel(server.grpc) as ch:  # gRPC task resources as well
                stub = pbgrpc.Mu2NetStub(ch)
                md = (("authorization", f"Bearer {token}"),) if token else None
                assert [t.name for t in stub.ListTasks(pb.ListTasksRequest(), metadata=md).tasks] == ["public"]
                with pytest.raises(grpc.RpcError) as e:
                    stub.GetTask(pb.GetTaskRequest(name="secret"), metadata=md)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
        for token in ("team-token", TOKEN):  # the group's read token, or the admin token, sees it
            headers = {"Authorization": f"Bearer {token}"}
            assert [t["name"] for t in httpx.get(f"{server.http}/v1/tasks", headers=headers).json()["tasks"]] == \
                ["public", "secret"]
            assert httpx.get(f"{server.http}/v1/tasks/secret", headers=headers).json()["labels"] == ["even", "odd"]
            with Client(server.grpc, server.http, token=token) as client:
                assert client.task("secret").name == "secret"
                result = client.classify("secret", x[:2])
                assert len(result.results) == 2 and result.results[0].labels[0] in ("even", "odd")
            r = httpx.post(f"{server.http}/v1/tasks/secret/classify", headers=headers, content=_png(x[0]))
            assert r.status_code == 200 and r.json()["results"][0]["labels"][0] in ("even", "odd")
        # a read token is not the admin token: it cannot upload or delete
        r = httpx.delete(f"{server.http}/v1/tasks/secret", headers={"Authorization": "Bearer team-token"})
        assert r.status_code == 401
        # the admin uploads a private task over HTTP: its answer shows it (ingestion runs on its own
        # threads, with the caller's token), and it is invisible without a token
        with Client(server.grpc, server.http, token=TOKEN) as client:
            task = client.upload("secret2", _npz_dict(digits_splits()), private=True, acl_group="team")
            assert task.name == "secret2" and task.private and task.state == "queued"
        assert "secret2" not in httpx.get(f"{server.http}/v1/tasks").text
        assert "secret2" in httpx.get(f"{server.http}/v1/tasks", headers={"Authorization": "Bearer team-token"}).text
    finally:
        assert server.stop() == 0, "".join(server.output[-40:])

"""The real server on 127.0.0.1: SDK end to end, tritonclient (grpc and http), bad input,
health and reflection, metrics, the status page, and hot-swap under load."""

from __future__ import annotations

import concurrent.futures
import io
import os
import tarfile
import threading
import zipfile

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import TINY, TINY_EVOLVER, digits_splits
from mu2net import root as R
from mu2net.evolver import Evolver, add_task_arrays, init_root
from mu2net.store import Store
from mu2net_client import (AlreadyExistsError, AuthenticationError, Client, InvalidArgumentError, NotFoundError,
                           NotReadyError, TooLargeError)
from mu2net_client._proto import mu2net_pb2 as pb
from mu2net_client._proto import mu2net_pb2_grpc as pbgrpc
from mu2net.server.launcher import RunningServer

TINY_SERVE_ARGS = ["--image-size", "8", "--patch-size", "4", "--width", "16", "--mlp-dim", "32", "--num-heads", "2",
                   "--generations", "2", "--children", "2", "--cycles", "4", "--sample-cap", "512",
                   "--batch-size", "32", "--quiet", "--iterations", "1", "--root-hparam", "flip=false",
                   "--root-hparam", "crop=false", "--root-hparam", "mu=0.3", "--root-hparam", "learning_rate=0.05"]
TOKEN = "s3cret"


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
    server = RunningServer(str(data), [*TINY_SERVE_ARGS, "--no-evolver", "--max-message-bytes", str(1 << 20),
                                       "--max-upload-bytes", str(4 << 20), "--max-archive-bytes", str(8 << 20),
                                       "--admin-token", TOKEN, "--max-batch-size", "16"])
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
                 "mu2net_system_version", 'mu2net_tasks{state="serving"} 1.0', "mu2net_evolver_task_iterations"):
        assert name in metrics, name
    page = httpx.get(server.http + "/")
    assert page.status_code == 200 and "<svg" in page.text and "digits" in page.text
    system = httpx.get(server.http + "/v1/system").json()
    assert system["total_params"] > 0 and system["tasks"]["digits"]["activated_params"] > 0


def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _png(v):
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), v, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/huge.png", b"\0" * (9 << 20))  # expands past the 8 MiB test cap
        zf.writestr("dog/a.png", _png(1))
    return buf.getvalue()


def _abs_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("/etc/evil.png"), _png(1))
    return buf.getvalue()


def _many_classes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        png = _png(3)
        for c in range(1001):
            zf.writestr(f"c{c}/a.png", png)
    return buf.getvalue()


BAD_DATASETS = {
    "traversal": (lambda: _tar([("../../evil.png", _png(1), "file")]), "parent path"),
    "absolute": (_abs_zip, "absolute"),
    "symlink": (lambda: _tar([("cat/a.png", b"", "sym")]), "link"),
    "zip_bomb": (_bomb, "zip bomb"),
    "non_image": (lambda: _tar([("cat/a.txt", b"hello", "file"), ("dog/b.png", _png(2), "file")]), "not an image"),
    "single_class": (lambda: _tar([(f"cat/{i}.png", _png(i), "file") for i in range(40)]), "at least 2"),
    "too_few": (lambda: _tar([(f"{c}/{i}.png", _png(i), "file") for c in ("a", "b") for i in range(4)]), "at least 10"),
    "class_limit": (_many_classes, "at most 1000"),
    "garbage": (lambda: b"this is not an archive", "neither a zip nor a tar"),
}


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


@pytest.mark.parametrize("problem", sorted(BAD_DATASETS))
def test_bad_uploads_are_rejected_and_nothing_stored_is_lost(static_server, problem):
    server, store = static_server
    make, match = BAD_DATASETS[problem]
    before = ([t.name for t in store.list_tasks()], store.system_version())
    r = httpx.post(server.http + "/v1/tasks", params={"name": f"bad_{problem}"}, content=make(),
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]
    assert ([t.name for t in store.list_tasks()], store.system_version()) == before
    assert not os.path.exists("/etc/evil.png")


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
    with grpc.insecure_channel(server.grpc) as ch:
        stub = pbgrpc.Mu2NetStub(ch)
        for shape, size in (([1, 8, 8], 64), ([-1, 8, 8, -1], 64), ([2, 8, 8, 1], 64)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Classify(pb.ClassifyRequest(task="digits", raw=pb.RawTensor(shape=shape, data=b"\0" * size)))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, shape
            assert str(shape) in e.value.details() and "[N, H, W, C]" in e.value.details()
    r = httpx.post(server.http + "/v1/tasks/digits/classify", content=b"x" * (2 << 20))
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = httpx.post(server.http + "/v1/tasks", params={"name": "big"}, content=b"x" * (5 << 20),
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 413
    assert httpx.get(server.http + "/v1/tasks/nope").status_code == 404
    assert httpx.get(server.http + "/v2/models/pending/ready").status_code == 503
    assert "error" in httpx.get(server.http + "/v2/models/nope").json()
    assert [t.name for t in store.list_tasks()] == ["digits", "pending"]


def test_hot_swap_under_load(static_server):
    """Concurrent classify calls while new versions are published: zero failures, and every
    answer names a version that was published."""
    server, store = static_server
    x, _ = digits_splits()["test"]
    published = {store.system_version()}
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
            published.add(store.system_version())
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

    asyncio.run(main())


def test_cli_client_commands(static_server, tmp_path):
    import json
    import subprocess
    import sys

    server, store = static_server
    common = ["--grpc", server.grpc, "--http", server.http]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mu2net.cli", *args], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})

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
    time.sleep(0.3)
    sigterm_at = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    thread.join(120)
    code = server.stop()
    time.sleep(0.5)
    assert code == 0, f"exit {code}: " + "".join(server.output[-40:])
    assert "error" not in outcome, outcome.get("error")
    assert outcome["finished"] > sigterm_at, f"the request took {outcome['seconds']:.2f}s and ended before SIGTERM"
    assert len(outcome["result"]) == 8192

"""The model repository: export of system versions, retention, mirrors of replicas, and
replicas serving (real servers on 127.0.0.1) what the evolver host publishes."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import httpx
import numpy as np
import pytest

from conftest import TINY_EVOLVER, digits_splits
from mu2net.evolver import Evolver
from mu2net.ingest import add_task_arrays
from mu2net.repository import Repository, RepositoryError, exporter
from mu2net.server.launcher import RunningServer
from mu2net.server.snapshot import SnapshotManager
from mu2net.store import Store, StoreError
from mu2net_client import Client


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3-compatible server (moto) with a bucket ``mu2net``: yields the environment that
    points fsspec and botocore at it and this process's storage options."""
    from mu2net.server.launcher import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def repository_url(request, tmp_path, monkeypatch):
    """A repository URL of each kind, with fsspec's storage options for this process (the
    environment, which server subprocesses inherit, carries the same for S3)."""
    if request.param == "local":
        yield str(tmp_path / "repo"), {}
        return
    env, options = request.getfixturevalue("s3_endpoint")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield f"s3://mu2net/{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}", options


def _served(store: Store) -> dict:
    version, tasks, paths = store.serving_state()
    return {"version": version, "tasks": sorted(t.name for t in tasks),
            "paths": sorted((p.id, p.task, tuple(p.component_ids)) for p in paths)}


def _repo_arrays(repo: Repository) -> set[str]:
    repo.fs.invalidate_cache()
    try:
        files = repo.fs.find(f"{repo.root}/arrays")
    except FileNotFoundError:
        return set()
    return {f.rsplit("/", 1)[-1][:-4] for f in files if f.endswith(".npz")}


def test_export_mirror_retention_and_deletion(tiny_store, tmp_path, repository_url, monkeypatch):
    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")
    url, options = repository_url
    repo = Repository(url, **options)
    assert repo.latest() is None and repo.versions() == []
    v1 = repo.export(tiny_store)
    assert v1 == tiny_store.system_version() and repo.latest() == v1 and repo.versions() == [v1]
    assert repo.export(tiny_store) is None  # the pointer already names it
    manifest = repo.manifest(v1)
    assert {c["params_digest"] for c in manifest["components"]} == _repo_arrays(repo)
    assert all(c["opt_digest"] is None for c in manifest["components"])  # replicas serve, they do not train

    # a store of its own cannot become a mirror, and nothing is imported into a store that is none
    with pytest.raises(StoreError, match="of its own"):
        tiny_store.make_mirror(url)
    with pytest.raises(StoreError, match="not a mirror"):
        tiny_store.import_state(manifest)
    mirror = Store(tmp_path / "mirror")
    mirror.make_mirror(url)
    with pytest.raises(StoreError, match="mirrors the repository"):
        mirror.make_mirror(str(tmp_path / "other"))
    assert repo.sync(mirror) == v1 and repo.sync(mirror) is None
    assert _served(mirror) == _served(tiny_store)
    # the mirror serves what the store serves, bit for bit
    x, _ = digits_splits()["test"]
    own, mirrored = SnapshotManager(tiny_store, max_batch_size=4), SnapshotManager(mirror, max_batch_size=4)
    assert own.refresh() and mirrored.refresh()
    np.testing.assert_array_equal(mirrored.snapshot.paths["digits"].predict(x[:4]),
                                  own.snapshot.paths["digits"].predict(x[:4]))
    assert mirror.history() == tiny_store.history()

    # retention: the newest 2 manifests, and only the arrays they use
    ev.active_phase("small")
    v2 = repo.export(tiny_store)
    ev.active_phase("parity")
    v3 = repo.export(tiny_store, keep=2)
    assert v1 < v2 < v3 and repo.versions() == [v2, v3]
    live = {c["params_digest"] for v in (v2, v3) for c in repo.manifest(v)["components"]}
    assert _repo_arrays(repo) == live
    with pytest.raises(RepositoryError, match="not in the repository"):
        repo.manifest(v1)
    assert repo.sync(mirror) == v3 and _served(mirror) == _served(tiny_store)
    assert mirrored.refresh() and set(mirrored.snapshot.paths) == {"digits", "small", "parity"}

    # a task added without a publish is a new revision of the same system version, mirrored at once
    add_task_arrays(tiny_store, "late", digits_splits(), [str(i) for i in range(10)], source="test")
    assert tiny_store.system_version() == v3 and repo.export(tiny_store) == v3
    assert repo.pointer()["revision"] == 1 and repo.export(tiny_store) is None
    assert repo.versions() == [v2, v3] and repo.manifest(v3)["revision"] == 1
    # the revision the pointer named before stays readable: a replica that read the old pointer
    assert repo.manifest(v3, 0)["revision"] == 0
    assert repo.sync(mirror) == v3 and "late" in [t.name for t in mirror.list_tasks()]
    assert repo.sync(mirror) is None


    # a deleted task leaves no manifest behind that still references its components, even when
    # the exporting process died between the pointer's write and the collection
    tiny_store.delete_task("parity")
    with monkeypatch.context() as m:
        m.setattr(repo, "collect", lambda keep=2: {})  # the process dies before its collect
        v4 = repo.export(tiny_store)
    assert repo.versions() == [v2, v3, v4] and not repo.collected
    # the next process's exporter finds nothing to write and collects what the last one left
    assert exporter(tiny_store, Repository(url, **options))() is None
    assert repo.versions() == [v4] and "parity" not in {t["name"] for t in repo.manifest(v4)["tasks"]}
    assert _repo_arrays(repo) == {c["params_digest"] for c in repo.manifest(v4)["components"]}
    # an array an export wrote before dying ahead of its manifest goes at a process's first collect
    stray = "ab" * 32
    repo.fs.makedirs(f"{repo.root}/arrays/ab", exist_ok=True)  # (a local directory's fsspec makes none)
    repo.fs.pipe_file(f"{repo.root}/arrays/ab/{stray}.npz", b"left by a dead export")
    fresh = Repository(url, **options)
    assert fresh.collect() == {"manifests": 0, "arrays": 1} and fresh.collect() == {"manifests": 0, "arrays": 0}
    assert stray not in _repo_arrays(repo)
    assert repo.sync(mirror) == v4 and "parity" not in _served(mirror)["tasks"]
    mirror_arrays = {f.stem for f in (mirror.data_dir / "arrays").rglob("*.npz")}
    assert mirror_arrays == {c.params_digest for c in mirror.list_components()}  # the deleted task's are gone
    assert mirrored.refresh() and set(mirrored.snapshot.paths) == {"digits", "small"}

    # a manifest an export wrote before dying ahead of its pointer write is not served, listed
    # or rolled back to, and the next export writes past its name (a name is written once)
    pointer = repo.pointer()
    orphan = f"{repo.root}/versions/{v4:012d}.{pointer['revision'] + 1:06d}.json"
    repo.fs.pipe_file(orphan, json.dumps({**repo.manifest(v4), "revision": pointer["revision"] + 1,
                                          "tasks": []}).encode())
    assert repo.versions() == [v4] and repo.manifest(v4)["revision"] == pointer["revision"]
    add_task_arrays(tiny_store, "later", digits_splits(), [str(i) for i in range(10)], source="test")
    assert repo.export(tiny_store) == v4 and repo.pointer()["revision"] == pointer["revision"] + 2
    assert "later" in {t["name"] for t in repo.manifest(v4)["tasks"]}
    assert not repo.fs.exists(orphan)  # collected: the pointer passed it
    assert repo.sync(mirror) == v4 and "later" in [t.name for t in mirror.list_tasks()]

    # a repository belongs to one store, and its pointer never moves back
    with Store(tmp_path / "other-store") as other:
        with pytest.raises(RepositoryError, match="belongs to the store"):
            repo.export(other)
    pointer = repo.pointer()
    ahead = {**pointer, "system_version": v4 + 10, "revision": 0, "manifest": f"versions/{v4 + 10:012d}.000000.json"}
    repo.fs.pipe_file(f"{repo.root}/latest.json", json.dumps(ahead).encode())
    with pytest.raises(RepositoryError, match="ahead of the store"):
        repo.export(tiny_store)
    repo.fs.pipe_file(f"{repo.root}/latest.json", json.dumps(pointer).encode())
    assert repo.latest() == v4
    # a mirror refuses what only the evolver host's store does
    with pytest.raises(StoreError, match="replica's mirror"):
        add_task_arrays(mirror, "x", digits_splits(), [str(i) for i in range(10)], source="test")
    with pytest.raises(StoreError, match="replica's mirror"):
        mirror.delete_task("digits")
    mirror.close()


def test_a_mirror_keeps_the_arrays_it_served_before_until_an_import_with_other_arrays(tiny_store, tmp_path):
    import hashlib

    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")
    repo = Repository(str(tmp_path / "repo"))
    base = repo.manifest(repo.export(tiny_store))
    mirror = Store(tmp_path / "mirror")
    mirror.make_mirror(repo.url)
    repo.sync(mirror)

    def with_extra(tag: bytes, revision: int) -> tuple[dict, str]:
        # the manifest with one more component whose array only this state has
        data = b"array of " + tag
        digest = hashlib.sha256(data).hexdigest()
        mirror.put_array_bytes(digest, data)
        extra = dict(base["components"][0], id=f"extra-{tag.decode()}", params_digest=digest)
        return {**base, "revision": revision, "components": [*base["components"], extra]}, digest

    def arrays() -> set[str]:
        return {f.stem for f in (mirror.data_dir / "arrays").rglob("*.npz")}

    a, da = with_extra(b"a", 1)
    mirror.import_state(a)
    b, db = with_extra(b"b", 2)
    mirror.import_state(b)
    assert {da, db} <= arrays()  # a's arrays stay while the loader may read them
    mirror.import_state({**b, "revision": 3})  # a new revision, the same arrays: the grace goes on
    assert {da, db} <= arrays()
    mirror.import_state({**base, "revision": 4})  # other arrays: a's go, b's get the grace
    assert da not in arrays() and db in arrays()
    mirror.close()


def test_a_rollback_restores_a_retained_path_and_pins_its_task(tiny_store, tmp_path):
    from mu2net.evolver import schedule as S
    from mu2net.store import ComponentsGone, ServedPathChanged, TaskPinned, new_id

    ev = Evolver(tiny_store, TINY_EVOLVER, progress=False)
    ev.active_phase("digits")
    repo = Repository(str(tmp_path / "repo"))
    v1 = repo.export(tiny_store)
    first = tiny_store.best_path("digits")
    x = digits_splits()["test"][0][:8]
    manager = SnapshotManager(tiny_store, max_batch_size=8)
    assert manager.refresh()
    answers = manager.snapshot.paths["digits"].predict(x)
    ev.active_phase("digits")
    assert tiny_store.best_path("digits").id != first.id  # (seeded) its second phase published
    repo.export(tiny_store)
    manifest = repo.manifest(v1)
    row = next(p for p in manifest["paths"] if p["task"] == "digits")
    gone = [c for c in first.component_ids if c not in {c.id for c in tiny_store.list_components()}]
    assert gone  # the first path's own components left the layer pool with it

    # a component trained on a task deleted since never comes back (Section 3.4)
    tainted = [dict(c, steps=json.dumps({**json.loads(c["steps"]), "deleted_task": 1})) if c["id"] == gone[0] else c
               for c in manifest["components"]]
    before = tiny_store.system_version()
    with pytest.raises(ComponentsGone, match="deleted_task"):
        tiny_store.restore_path(row, tainted, repo.read_array)
    assert tiny_store.system_version() == before

    # the served path and the pin a rollback chose from are checked again in its transaction
    # (of two rollbacks at once, the second does not go a second step back)
    with pytest.raises(ServedPathChanged, match="served path changed"):
        tiny_store.restore_path(row, manifest["components"], repo.read_array, expect_served=first.id)
    assert tiny_store.system_version() == before and not tiny_store.get_task("digits").pinned
    version = tiny_store.restore_path(row, manifest["components"], repo.read_array,
                                      expect_served=tiny_store.best_path("digits").id, refuse_pinned=True)
    assert version == before + 1 and tiny_store.best_path("digits").id == first.id
    with pytest.raises(ServedPathChanged, match="pinned meanwhile"):
        tiny_store.restore_path(row, manifest["components"], repo.read_array, refuse_pinned=True)
    assert tiny_store.system_version() == version
    assert tiny_store.history("digits")[-1]["path_id"] == first.id and tiny_store.get_task("digits").pinned
    restored = tiny_store.get_components(gone)
    assert all(c.opt_digest is None for c in restored)  # back without momentum
    assert manager.refresh()  # served again, it answers as it did at v1
    np.testing.assert_array_equal(manager.snapshot.paths["digits"].predict(x), answers)
    # the evolver does not choose a pinned task, and a phase of it running meanwhile does not replace its path
    def choice():  # between digits (served) and nothing: the other tasks were never served
        return S.next_task([tiny_store.get_task("digits")], tiny_store.served_versions(), iterations=0,
                           continual=True)
    assert choice() is None and not S.is_live(tiny_store.get_task("digits"), time.time())
    with pytest.raises(TaskPinned, match="pinned"):
        tiny_store.publish(dataclasses.replace(first, id=new_id()), [], task="digits")
    with pytest.raises(TaskPinned):  # its end publishes (a path, or only its bookkeeping): refused
        ev.active_phase("digits")
    assert tiny_store.best_path("digits").id == first.id and tiny_store.system_version() == version
    assert not tiny_store.wake_task("digits").pinned
    assert choice().name == "digits"  # woken, it evolves again


@pytest.mark.parametrize("woken", [False, True])
def test_a_phase_whose_task_is_rolled_back_meanwhile_stops_and_ends_uncounted(tiny_store, tmp_path, monkeypatch,
                                                                             woken):
    # a rollback during a phase (as mu2net serve's evolver runs it, with preemption checks)
    # stops its children after their current cycle; the phase publishes nothing and is not
    # counted, also when the user woke the task again at once (its phase continues the
    # lineage the user left)
    import mu2net.evolver.loop as loop

    for other in ("parity", "small"):  # never served: run() would choose them first
        tiny_store.delete_task(other)
    cfg = dataclasses.replace(TINY_EVOLVER, preempt=True, generations=3,
                              budget=dataclasses.replace(TINY_EVOLVER.budget, cycles=4))
    ev = Evolver(tiny_store, cfg, progress=False)
    ev.preempt_check_seconds = 0.0
    ev.active_phase("digits")
    repo = Repository(str(tmp_path / "repo"))
    manifest = repo.manifest(repo.export(tiny_store))
    row = next(p for p in manifest["paths"] if p["task"] == "digits")
    cycles, real = [], loop.train_child

    def rolled_back_during(*a, interrupt=None, **k):
        if not cycles:  # the first child: the user rolls back (to the served path) as it starts
            tiny_store.restore_path(row, manifest["components"], repo.read_array)
            if woken:
                tiny_store.wake_task("digits")
        result = real(*a, interrupt=interrupt, **k)
        cycles.append(len(result.history))  # validations: one per cycle run
        return result

    monkeypatch.setattr(loop, "train_child", rolled_back_during)
    before = tiny_store.get_task("digits")
    version = tiny_store.system_version()
    assert ev.run(iterations=before.iterations_done + 1, stop=lambda: len(cycles) > 0 and woken) == 1
    after = tiny_store.get_task("digits")
    assert after.pinned is not woken and after.rolled_back_version == version + 1
    # the first generation's children stopped after one cycle; no later generation trained
    assert 1 <= len(cycles) <= cfg.children and all(c < cfg.budget.cycles for c in cycles)
    assert after.iterations_done == before.iterations_done and after.state != "failed"
    assert after.error is None and after.retry_after is None  # not a failure: no back-off
    assert after.attempts == before.attempts  # the attempt is uncounted
    assert tiny_store.system_version() == version + 1  # the rollback's publish only
    assert tiny_store.best_path("digits").id == row["id"]


def test_a_corrupt_or_hostile_repository_changes_nothing_in_the_mirror(tiny_store, tmp_path):
    Evolver(tiny_store, TINY_EVOLVER, progress=False).active_phase("digits")
    repo_dir = tmp_path / "repo"
    repo = Repository(str(repo_dir))
    version = repo.export(tiny_store)
    mirror = Store(tmp_path / "mirror")
    mirror.make_mirror(str(repo_dir))
    # an array whose bytes do not match its digest is refused
    head = repo.manifest(version)["components"][-1]["params_digest"]
    array = repo_dir / "arrays" / head[:2] / f"{head}.npz"
    good = array.read_bytes()
    array.write_bytes(good[:-10])
    with pytest.raises(RepositoryError, match="does not match its digest"):
        repo.sync(mirror)
    assert mirror.system_version() == 0 and mirror.list_tasks() == []
    array.write_bytes(good)
    # a manifest naming a path outside the repository as a digest is refused before any read
    manifest_file = repo_dir / repo.pointer()["manifest"]
    manifest = json.loads(manifest_file.read_text())
    digest = manifest["components"][0]["params_digest"]
    manifest["components"][0]["params_digest"] = "../../../etc/passwd"
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(RepositoryError, match="no sha256 parameter digest"):
        Repository(str(repo_dir)).sync(mirror)  # a new reader (a manifest is cached once read: it never changes)
    # a row with a column the store does not have is refused inside the transaction
    manifest["components"][0]["params_digest"] = digest
    manifest["tasks"][0]["dropped_table"] = 1
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="unknown columns"):
        Repository(str(repo_dir)).sync(mirror)
    assert mirror.system_version() == 0 and mirror.list_tasks() == []
    (repo_dir / "latest.json").write_text("{not json")
    with pytest.raises(RepositoryError, match="not valid JSON"):
        repo.latest()
    mirror.close()


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _version(server: RunningServer) -> int:
    return httpx.get(server.http + "/v1/system", timeout=10).json()["system_version"]


def _stable_version(server: RunningServer, seconds: float = 3.0, timeout: float = 600) -> int:
    """The server's system version once it has not changed for ``seconds``."""
    deadline = time.time() + timeout
    last, since = _version(server), time.time()
    while time.time() < deadline:
        time.sleep(0.5)
        now = _version(server)
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= seconds:
            return last
    raise AssertionError(f"the system version did not settle within {timeout:.0f}s")


def _stop_all(servers) -> None:
    """Stops every server still running, then asserts each stopped cleanly."""
    codes = [(s, s.stop()) for s in servers if s.proc.poll() is None]
    for s, code in codes:
        assert code == 0, "".join(s.output[-40:])


def test_replicas_serve_what_the_evolver_host_publishes_and_forward_its_uploads(tmp_path, repository_url):
    import grpc

    from conftest import TINY
    from mu2net_client._proto import mu2net_pb2 as pb
    from mu2net_client._proto import mu2net_pb2_grpc as pbgrpc
    from test_server import TINY_SERVE_ARGS, _npz_dict

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    from serving import publish_new_head

    repo, options = repository_url
    reader = Repository(repo, **options)
    servers = [RunningServer(str(tmp_path / "primary"), [*TINY_SERVE_ARGS, "--no-continual", "--repository", repo,
                                                         "--keep-versions", "50"])]
    primary = servers[0]
    try:
        for i in range(2):
            servers.append(RunningServer(str(tmp_path / f"replica{i}"), [
                *TINY_SERVE_ARGS, "--no-evolver", "--repository", repo, "--ingest-url", primary.http]))
        replicas = servers[1:]
        splits = digits_splits(limit=900)
        x, _ = splits["test"]
        # an upload sent to a replica goes to the evolver host, is evolved there, and served by
        # both replicas; the replica that answers the waits sees the task at once
        with Client(replicas[0].grpc, replicas[0].http, timeout=60) as client:
            task = client.upload("digits", _npz_dict(splits))
            assert task.state == "queued"
            client.wait_until_serving("digits", timeout=600, progress=False)
        # the evolver's one iteration of digits is done (the first answer comes before it; a
        # publish after this point would replace the newer head below and change the rollback)
        _wait(lambda: httpx.get(primary.http + "/v1/tasks/digits").json()["iterations_done"] >= 1, 600,
              "the evolver to finish its iteration of digits")
        settled = _stable_version(primary)
        with Client(primary.grpc, primary.http, timeout=60) as client:
            expected = client.classify("digits", x[:16])
        assert expected.system_version == settled
        for r in replicas:
            _wait(lambda r=r: _version(r) == settled, 60, "the replica to load the settled version")
            with Client(r.grpc, r.http, timeout=60) as client:
                got = client.classify("digits", x[:16])
            assert got.system_version == settled and got.path_id == expected.path_id
            assert [a.label_ids for a in got.results] == [b.label_ids for b in expected.results]
            np.testing.assert_array_equal([a.scores for a in got.results], [b.scores for b in expected.results])
        # the same name again is refused by the evolver host, and the replica answers with its code
        resp = httpx.post(replicas[1].http + "/v1/tasks", params={"name": "digits"}, content=b"x", timeout=30)
        assert resp.status_code == 409 and "digits" in resp.json()["error"]

        # roll digits back through a replica: the evolver host serves its earlier path again,
        # pinned, and so does every replica
        earlier = expected.path_id
        with Store(tmp_path / "primary") as store:  # a newer path of digits (a new head), as a publish makes
            newer = publish_new_head(store, "digits", TINY, seed=99)
        for s in servers:
            _wait(lambda s=s: _version(s) >= newer, 60, "the newer version to be served")
        assert httpx.post(primary.http + "/v1/tasks/digits/rollback", params={"version": "abc"}).status_code == 400
        assert httpx.post(primary.http + "/v1/tasks/digits/rollback", params={"version": "99999"}).status_code == 404
        resp = httpx.post(replicas[1].http + "/v1/tasks/digits/rollback", timeout=60)
        assert resp.status_code == 200, resp.text
        back = resp.json()
        assert back["rolled_back_to"]["path_id"] == earlier and back["path_id"] == earlier
        assert back["evolution"]["pinned"] and back["system_version"] > newer
        with grpc.insecure_channel(replicas[1].grpc) as ch:  # gRPC shows the pin too, once mirrored
            _wait(lambda: pbgrpc.Mu2NetStub(ch).GetTask(pb.GetTaskRequest(name="digits"), timeout=30).pinned, 60,
                  "gRPC GetTask to show the pin")
        for s in servers:
            _wait(lambda s=s: httpx.get(s.http + "/v1/tasks/digits").json()["path_id"] == earlier, 60,
                  "the rolled-back path to be served")
        assert reader.manifest(reader.latest())["history"][-1]["path_id"] == earlier
        # the same request again (a retry) does not roll the pinned task forward to the newer path
        again = httpx.post(primary.http + "/v1/tasks/digits/rollback", timeout=60)
        assert again.status_code == 400 and "already rolled back" in again.json()["error"], again.text
        assert httpx.get(primary.http + "/v1/tasks/digits").json()["path_id"] == earlier
        woken = httpx.post(replicas[1].http + "/v1/tasks/digits/evolve", timeout=60)
        assert woken.status_code == 202 and not woken.json()["evolution"]["pinned"], woken.text

        # kill -9 of a replica loses nothing; a new one on the same mirror serves the latest version
        replicas[0].proc.kill()
        replicas[0].proc.wait()
        servers[1] = replicas[0] = RunningServer(str(tmp_path / "replica0"),
                                                 [*TINY_SERVE_ARGS, "--no-evolver", "--repository", repo])
        _wait(lambda: _version(replicas[0]) == reader.latest(), 60, "the restarted replica to serve the latest")
        # without --ingest-url a replica refuses writes with 503 and says where they go
        resp = httpx.delete(replicas[0].http + "/v1/tasks/digits", timeout=30)
        assert resp.status_code == 503 and "read-only replica" in resp.json()["error"]
        # deleted through a replica: gone from every replica once the repository has the version
        resp = httpx.delete(replicas[1].http + "/v1/tasks/digits", timeout=30)
        assert resp.status_code == 200, resp.text
        for r in replicas:
            _wait(lambda r=r: "digits" not in [t["name"] for t in httpx.get(r.http + "/v1/tasks").json()["tasks"]],
                  60, "the deleted task to leave the replica")
        status = httpx.get(replicas[1].http + "/v1/system", timeout=10).json()["repository"]
        assert status["role"] == "replica" and status["last_error"] is None and status["url"] == repo
        assert status["last_version"] == reader.latest()
    finally:
        _stop_all(servers)


def test_a_replica_refuses_a_store_of_its_own_and_an_evolver_host_refuses_a_mirror(tiny_store, tmp_path):
    import subprocess
    import sys

    def serve(*args):
        return subprocess.run([sys.executable, "-m", "mu2net.cli", "serve", "--grpc-port", "0", "--http-port", "0",
                               *args], capture_output=True, text=True, timeout=120)

    repo = str(tmp_path / "repo")
    out = serve("--data-dir", str(tiny_store.data_dir), "--no-evolver", "--repository", repo)
    assert out.returncode != 0 and "of its own" in out.stderr
    assert [t.name for t in tiny_store.list_tasks()] == ["digits", "parity", "small"]  # untouched
    mirror = Store(tmp_path / "mirror")
    mirror.make_mirror(repo)
    mirror.close()
    out = serve("--data-dir", str(tmp_path / "mirror"), "--repository", repo)
    assert out.returncode != 0 and "is a replica's mirror" in out.stderr
    out = serve("--data-dir", str(tmp_path / "x"), "--ingest-url", "http://127.0.0.1:1")
    assert out.returncode != 0 and "--ingest-url is for a replica" in out.stderr

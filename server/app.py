"""``mu2net serve``: gRPC and HTTP in one process, plus a supervised evolver process.

SIGTERM (or SIGINT) stops accepting work, drains in-flight HTTP and gRPC requests, stops
the evolver process and exits 0. Further SIGTERM/SIGINT during the drain are ignored; the
drain is bounded (30 s for HTTP, 30 s for gRPC, 15 s for the evolver before SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator, Sequence

import uvicorn

from mu2net.repository import DEFAULT_KEEP, Poller, Repository, exporter
from mu2net.server.grpc_api import start_grpc
from mu2net.server.http_api import build_app
from mu2net.server.metrics import Metrics
from mu2net.server.service import Service, ServiceConfig
from mu2net.store import Store

log = logging.getLogger("mu2net.server")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: :func:`serve` owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclasses.dataclass
class EvolverSupervisor:
    """Runs the evolver process, restarts it when it dies (with backoff), stops it on shutdown."""

    argv: list[str]
    metrics: Metrics | None = None
    store: Store | None = None
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False

    def _spawn(self) -> subprocess.Popen[bytes]:
        # --parent-pid: the evolver dies with its server, even when the server is killed with SIGKILL
        return subprocess.Popen([sys.executable, "-m", "mu2net.server.evolver_process", *self.argv,
                                 "--parent-pid", str(os.getpid())])

    def start(self) -> None:
        self.process = self._spawn()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(1.0)
            if self.process is not None and self.process.poll() is not None and not self._stopping:
                code = self.process.returncode
                delay = min(30.0, 2.0 ** min(self.restarts, 5))
                if code == 3:  # evolver_process: another evolver holds the store's lock
                    log.warning("another evolver process runs on this store (it holds its evolver.lock); "
                                "this server's evolver retries in %.0fs", delay)
                else:
                    log.warning("evolver process exited with %s; restarting in %.0fs", code, delay)
                await asyncio.to_thread(self._record, "restarting")
                await asyncio.sleep(delay)
                if self._stopping:
                    return
                self.restarts += 1
                if self.metrics is not None:
                    self.metrics.evolver_restarts.inc()
                self.process = self._spawn()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        p = self.process
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                await asyncio.to_thread(p.wait, 15)
            except subprocess.TimeoutExpired:
                p.kill()
                await asyncio.to_thread(p.wait)
        await asyncio.to_thread(self._record, "stopped")

    def _record(self, state: str) -> None:
        """Writes the evolver status for the server's status views: the process that wrote
        the last one is gone, so it must not keep showing the phase it was in."""
        if self.store is None:
            return
        try:
            self.store.set_evolver_status({"state": state, "task": None, "phase": state, "updated": time.time(),
                                           "pid": None})
        except Exception as e:  # informative only
            log.warning("could not record the evolver status %r: %s", state, e)


def _remove_orphans(store: Store) -> None:
    """Start-up check: removes what a killed process left behind (Store.remove_orphans),
    holding the evolver lock so that no evolver writes meanwhile; skipped if one runs."""
    from mu2net.store import EvolverRunning, evolver_lock

    try:
        lock = evolver_lock(store.data_dir)
    except EvolverRunning as e:
        log.warning("start-up cleanup skipped: %s", e)
        return
    try:
        removed = store.remove_orphans()
    finally:
        lock.release()
    if any(removed.values()):
        log.warning("start-up cleanup removed %s", ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in removed.items()
                                                             if n))


async def serve(data_dir: str, host: str, grpc_port: int, http_port: int, config: ServiceConfig,
                evolver_argv: Sequence[str] | None, tls: tuple[str, str, str | None] | None = None,
                repository: str | None = None, keep_versions: int = DEFAULT_KEEP) -> int:
    """Runs the server until SIGTERM/SIGINT. ``evolver_argv=None`` runs no evolver.

    ``tls`` = (certificate chain PEM, private key PEM, client CA PEM or None): gRPC and HTTPS
    over TLS; with a client CA both require client certificates signed by it.

    ``repository``: a model repository URL (:mod:`mu2net.repository`). With
    ``config.replica`` the store in ``data_dir`` is a local mirror of the repository's
    pointed-to version, synced every 0.5 s before the snapshot loader swaps it in;
    otherwise every new system version of the store is exported to it (the newest
    ``keep_versions`` manifests kept readable).
    """
    store = Store(data_dir)
    _remove_orphans(store)
    metrics = Metrics()
    service = Service(store, config, metrics=metrics)
    poller = None
    if repository is not None:
        repo = Repository(repository)
        if config.replica:
            poller = Poller("repository-sync", lambda: repo.sync(store), repository=repo)
        else:
            poller = Poller("repository-export", exporter(store, repo, keep_versions), repository=repo)
        service.repository = poller
        # what /v1/system shows before anything new is written or mirrored
        if config.replica:
            poller.last_version = (store.mirrored_manifest() or {}).get("system_version")
        else:
            with contextlib.suppress(Exception):  # unreadable now: the poller reports it
                poller.last_version = repo.latest()
        if config.replica:  # the first mirror before the first snapshot
            await asyncio.to_thread(poller.start)
    await asyncio.to_thread(service.manager.start)
    if poller is not None and not config.replica:
        poller.start(poll_first=False)  # exports on its thread; serving does not wait for it
    grpc_server, grpc_bound = await start_grpc(service, host, grpc_port, config.max_message_bytes, tls)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, http_port))
    http_bound = sock.getsockname()[1]
    upload_dir = tempfile.mkdtemp(prefix="uploads-", dir=store.data_dir)
    ssl_options: dict[str, object] = {}
    if tls is not None:
        import ssl

        ssl_options = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]}
        if tls[2] is not None:
            ssl_options.update(ssl_ca_certs=tls[2], ssl_cert_reqs=ssl.CERT_REQUIRED)
    uv = _Uvicorn(uvicorn.Config(build_app(service, upload_dir), log_level="warning", lifespan="off",
                                 timeout_graceful_shutdown=30, **ssl_options))  # type: ignore[arg-type]
    http_task = asyncio.create_task(uv.serve(sockets=[sock]))
    supervisor = None
    if evolver_argv is not None:
        supervisor = EvolverSupervisor(["--data-dir", data_dir, *evolver_argv], metrics, store)
        supervisor.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not uv.started and not http_task.done():
        await asyncio.sleep(0.05)
    scheme = "https" if tls is not None else "http"
    print(f"mu2net serving: grpc={host}:{grpc_bound} http={scheme}://{host}:{http_bound} "
          f"system_version={service.manager.snapshot.version}", flush=True)
    await stop.wait()
    # shutdown has begun: a repeated SIGTERM must not cut the drain short (or the exit code)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log.info("shutting down: draining in-flight requests")
    await grpc_server.health_servicer.enter_graceful_shutdown()
    uv.should_exit = True
    # HTTP, gRPC and the evolver drain at once, each within 30 s (with 15 s for the evolver's
    # SIGTERM), so a shutdown takes at most about 30 s (then up to 10 s for the repository exporter and
    # its last export)
    results = await asyncio.gather(http_task, grpc_server.stop(grace=30),
                                   *([supervisor.stop()] if supervisor is not None else []), return_exceptions=True)
    for r in results:  # one part failing must not cut the others' drain short
        if isinstance(r, BaseException):
            log.error("shutdown: %r", r)
    if poller is not None:
        await asyncio.to_thread(poller.stop)
        if not config.replica:  # the last publishes before the shutdown reach the replicas now
            await asyncio.to_thread(poller.poll)
    abandoned = service.ingesting  # uploads whose requests the HTTP drain cut off after 30 s
    service.close()
    if abandoned:
        # their threads would hold the interpreter's exit for as long as the ingestion
        # takes; leave now: a task row commits whole or not at all, and a start-up sweep
        # removes the files of one that did not once they are an hour old (as after a kill -9)
        log.warning("shutdown: %d upload(s) still being ingested are abandoned; nothing of them was committed "
                    "unless their 202 was sent, and the start-up sweep removes their files once they are an hour "
                    "old", abandoned)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    store.close()
    return 0

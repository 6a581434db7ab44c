"""Starts the real ``mu2net serve`` in a subprocess (tests and benchmarks)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from typing import Iterator, Sequence


@contextlib.contextmanager
def s3_server(bucket: str = "mu2net") -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """An S3-compatible server on 127.0.0.1 (moto's server mode, as s3fs's own tests use;
    the test extra's ``moto[server]``) with ``bucket`` made. Yields the environment that
    points fsspec and botocore at it (``FSSPEC_S3_ENDPOINT_URL`` and credentials: set it
    in ``os.environ`` and server subprocesses inherit it) and the fsspec storage options
    for this process (``endpoint_url``, ``key``, ``secret``)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        s3fs.S3FileSystem(**options).mkdir(bucket)
        yield ({"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}, options)
    finally:
        server.stop()


class RunningServer:
    """A ``mu2net serve`` subprocess; ``grpc`` is host:port, ``http`` the base URL."""

    def __init__(self, data_dir: str, args: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mu2net.cli", "serve", "--data-dir", data_dir, "--grpc-port", "0",
             "--http-port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.output: list[str] = []
        assert self.proc.stdout is not None  # stdout=PIPE above
        self._stdout = self.proc.stdout
        while True:
            line = self._stdout.readline()
            if not line:
                raise RuntimeError("server exited before serving:\n" + "".join(self.output[-50:]))
            self.output.append(line)
            m = re.search(r"mu2net serving: grpc=(\S+) http=(\S+)", line)
            if m:
                self.grpc, self.http = m.group(1), m.group(2)
                break
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self._stdout:
            self.output.append(line)

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux ``/proc``)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

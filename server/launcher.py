"""Starts the real ``mu2net serve`` in a subprocess (tests and benchmarks)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from typing import Sequence

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

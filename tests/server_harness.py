"""Starts the real ``mu2net serve`` in a subprocess on 127.0.0.1 for tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from typing import Sequence

TINY_SERVE_ARGS = ["--image-size", "8", "--patch-size", "4", "--width", "16", "--mlp-dim", "32", "--num-heads", "2",
                   "--generations", "2", "--children", "2", "--cycles", "4", "--sample-cap", "512",
                   "--batch-size", "32", "--quiet", "--iterations", "1", "--root-hparam", "flip=false",
                   "--root-hparam", "crop=false", "--root-hparam", "mu=0.3", "--root-hparam", "learning_rate=0.05"]


class RunningServer:
    """A ``mu2net serve`` subprocess; ``grpc`` is host:port, ``http`` the base URL."""

    def __init__(self, data_dir: str, extra: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mu2net.cli", "serve", "--data-dir", data_dir, "--grpc-port", "0",
             "--http-port", "0", *TINY_SERVE_ARGS, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.output: list[str] = []
        while True:
            line = self.proc.stdout.readline()
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
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

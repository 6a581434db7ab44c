"""mu2net.server: gRPC/HTTP serving with atomic hot-swap of published paths.

Public names are imported lazily, so that importing :mod:`mu2net.server.launcher` (tests,
benchmarks) does not register the server's protobuf descriptors in that process (an
Open Inference Protocol client such as tritonclient registers the same message names).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "serve": "mu2net.server.app", "ClassifyResult": "mu2net.server.service", "Service": "mu2net.server.service",
    "ServiceConfig": "mu2net.server.service", "ServedPath": "mu2net.server.snapshot",
    "Snapshot": "mu2net.server.snapshot", "SnapshotManager": "mu2net.server.snapshot",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mu2net.server' has no attribute {name!r}")

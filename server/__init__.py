"""mu2net.server: gRPC/HTTP serving with atomic hot-swap of published paths."""

from mu2net.server.app import serve
from mu2net.server.service import ClassifyResult, Service, ServiceConfig
from mu2net.server.snapshot import ServedPath, Snapshot, SnapshotManager

__all__ = ["serve", "ClassifyResult", "Service", "ServiceConfig", "ServedPath", "Snapshot", "SnapshotManager"]

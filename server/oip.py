"""Open Inference Protocol helpers shared by the gRPC and REST front ends.

No protobuf here: a process (a test, an OIP client such as tritonclient) may import the
REST front end without registering the server's ``inference.*`` message descriptors.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from mu2net.server import errors as E
from mu2net.server.service import Service, raw_images

SERVER_NAME = "mu2net"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["classification", "binary_tensor_data"]
INPUT_NAME = "IMAGE"
OUTPUT_NAME = "PROBABILITIES"

def serialize_bytes_tensor(items: list[bytes]) -> bytes:
    """BYTES tensor raw encoding: each element as a 4-byte little-endian length + bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def deserialize_bytes_tensor(data: bytes) -> list[bytes]:
    """Inverse of :func:`serialize_bytes_tensor`.

    Raises:
      InvalidArgument: on a truncated element.
    """
    out, i = [], 0
    while i < len(data):
        if i + 4 > len(data):
            raise E.InvalidArgument("BYTES tensor is truncated (incomplete length prefix)")
        (n,) = struct.unpack_from("<I", data, i)
        if i + 4 + n > len(data):
            raise E.InvalidArgument(f"BYTES tensor element of {n} bytes is truncated")
        out.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return out


def classification_strings(result: Any, k: int) -> list[bytes]:
    """Classification extension: ``"<score>:<index>:<label>"`` per image and rank, row-major."""
    return [f"{s:f}:{i}:{l}".encode() for ids, scores, labels in
            zip(result.label_ids[:, :k], result.scores[:, :k], result.labels) for i, s, l in zip(ids, scores, labels[:k])]


def model_metadata(service: Service, name: str) -> dict[str, Any]:
    served = service.served(name)
    h, w, c = served.task.image_shape
    return {"name": name, "versions": [str(served.version)], "platform": "mu2net_jax",
            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, h, w, c]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, served.path.architecture.num_classes]}]}


def requested_classification(outputs: list[tuple[str, dict[str, Any]]]) -> int:
    """The classification extension's class count (0 = plain probabilities).

    Raises:
      InvalidArgument: for an unknown output name or a bad class count.
    """
    k = 0
    for name, params in outputs:
        if name != OUTPUT_NAME:
            raise E.InvalidArgument(f"unknown output {name!r}; allowed: {OUTPUT_NAME!r}")
        if params.get("classification") is not None:
            try:
                k = int(params["classification"])
            except (ValueError, TypeError, OverflowError):
                raise E.InvalidArgument(f"classification={params['classification']!r}; allowed: an integer >= 1") from None
            if k < 1:
                raise E.InvalidArgument(f"classification={k}; allowed: >= 1")
    return k


def request_timeout(parameters: dict[str, Any] | None) -> float | None:
    """The request-level ``timeout`` parameter of Triton's schedule-policy extension to the
    Open Inference Protocol: an integer number of **microseconds** (0 or absent: no timeout),
    returned in seconds. Images not computed by then are dropped unrun (DEADLINE_EXCEEDED /
    504).

    Raises:
      InvalidArgument: a timeout that is not a non-negative integer.
    """
    value = (parameters or {}).get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise E.InvalidArgument(f"parameters.timeout={value!r}; allowed: an integer number of microseconds in "
                                "0..2**63-1 (int64; 0: no timeout)")
    return value / 1e6 if value else None


def earliest(*timeouts: float | None) -> float | None:
    """The shortest of the given timeouts in seconds (None: no limit)."""
    given = [t for t in timeouts if t is not None]
    return min(given) if given else None


def infer_input(datatype: str, shape: list[int], raw: bytes | None, uint_contents: list[int],
                bytes_contents: list[bytes]) -> tuple[list[bytes], np.ndarray | None]:
    """Decodes the one inference input: UINT8 pixels or BYTES encoded images.

    Returns:
      (encoded images, raw pixels): exactly one is non-empty.
    """
    if datatype == "UINT8":
        if len(shape) == 3:
            shape = [1] + shape
        if len(shape) != 4 or any(s < 1 for s in shape):
            raise E.InvalidArgument(f"UINT8 input shape {shape}; allowed: [N, H, W, C] (or [H, W, C])")
        if raw is None and any(not 0 <= v <= 255 for v in uint_contents):
            raise E.InvalidArgument("UINT8 input contents must lie in 0..255")
        data = raw if raw is not None else bytes(np.asarray(uint_contents, np.uint8))
        return [], raw_images(shape, data, "UINT8 input")
    if datatype == "BYTES":
        items = deserialize_bytes_tensor(raw) if raw is not None else list(bytes_contents)
        if len(shape) not in (1, 2) or math.prod(shape) != len(items) or not items:
            raise E.InvalidArgument(f"BYTES input shape {shape} does not match its {len(items)} elements; allowed: [N]")
        return items, None
    raise E.InvalidArgument(f"input datatype {datatype!r}; allowed: UINT8 (pixels) or BYTES (encoded images)")

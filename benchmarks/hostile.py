"""Hostile and careless inputs against a real ``mu2net serve``: every kind must be answered
with its client error (an HTTP 4xx, or 503 for a task not serving yet; gRPC: its
client-error status) and a message naming the problem, the store
unchanged and the server alive (issue 17's hostile-input figure, docs/reliability.md).

:data:`CASES` is the catalogue: uploads (decompression and zip bombs, huge label ids,
decoded-size bombs, truncated and corrupt archives, traversal, links, degenerate datasets,
bad names, tokens and limits), HTTP classify, the Open Inference Protocol REST API, gRPC
and admin routes. Each case sends one request and is checked for:

* the expected status (HTTP code, or gRPC status name) and a substring of the error message;
* the store unchanged: task names, states and served paths, the system version, and the
  files under ``datasets/``, ``arrays/`` and the server's upload spool directory;
* the server alive: ``/v2/health/live`` answers and a valid image still classifies.

The test suite runs the same catalogue against its server (tests/test_server.py); this
script starts its own on a new store (a tiny ViT trained on sklearn digits for a few
seconds, ``--no-evolver`` so nothing else changes the store) and writes the per-kind table:

    python benchmarks/hostile.py --out docs/hostile.json
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import itertools
import json
import socket
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

#: Admin token of the server under test.
TOKEN = "hostile-token"
#: ``mu2net serve`` limits the catalogue's sizes are made against (1 MiB messages, 4 MiB
#: uploads, 8 MiB decoded archives).
SERVER_LIMITS = ["--max-message-bytes", str(1 << 20), "--max-upload-bytes", str(4 << 20),
                 "--max-archive-bytes", str(8 << 20), "--admin-token", TOKEN, "--max-batch-size", "16"]


@dataclasses.dataclass(frozen=True)
class Target:
    """The server under test: ``http`` base URL, ``grpc`` host:port; ``task`` serves a
    10-class 8x8 gray task, ``pending`` is a task without a served path."""

    http: str
    grpc: str
    task: str = "digits"
    pending: str = "pending"


@dataclasses.dataclass(frozen=True)
class Case:
    """One hostile request: ``send`` returns (status: the HTTP code or gRPC status name, the
    error message)."""

    kind: str
    api: str
    what: str
    expect: str
    match: str
    send: Callable[[Target], tuple[str, str]]


# ---- request makers --------------------------------------------------------------------

def png(value: int = 3, size: tuple[int, int] = (6, 6)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def big_png(side: int = 8000) -> bytes:
    """A ``side`` x ``side`` black PNG: 64 M pixels in a few KB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def header_bomb_png(side: int = 100_000) -> bytes:
    """A PNG whose header claims ``side`` x ``side`` pixels (10 G) over a few bytes of data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def tar(members: list[tuple[str, bytes, str]], mode: str = "w") -> bytes:
    """A tar of (name, data, kind) members; kind ``file``, ``sym``, ``hard`` or ``fifo``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tf.addfile(info)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
                tf.addfile(info)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def two_classes(n: int = 20) -> list[tuple[str, bytes, str]]:
    return [(f"{c}/{i}.png", png(i + (100 if c == "b" else 0)), "file") for c in ("a", "b") for i in range(n)]


def zip_of(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name) if name.startswith("/") else name, data)
    return buf.getvalue()


def raw_npz(members: dict[str, tuple[tuple[int, ...], str]]) -> bytes:
    """An .npz written by hand: each member an .npy header declaring (shape, dtype) over 64
    zero bytes (numpy's own writer refuses impossible shapes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, (shape, descr) in members.items():
            f = io.BytesIO()
            np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
            zf.writestr(f"{name}.npy", f.getvalue() + bytes(64))
    return buf.getvalue()


def encrypted_zip() -> bytes:
    """A zip whose first member is flagged encrypted (general purpose bit 0 set in its local
    header and central directory entry; zipfile then asks for a password)."""
    raw = bytearray(zip_of([(n, d) for n, d, _ in two_classes()]))
    local = raw.index(b"PK\x03\x04")
    central = raw.index(b"PK\x01\x02")
    raw[local + 6] |= 0x1
    raw[central + 8] |= 0x1
    return bytes(raw)


def corrupt_tar_xz() -> bytes:
    data = bytearray(tar(two_classes(), mode="w:xz"))
    for i in range(200, min(len(data) - 64, 1200)):
        data[i] ^= 0x5A
    return bytes(data)


def zip_bomb() -> bytes:
    """9 MiB of zeros deflated to a few KB: past the 8 MiB archive cap."""
    return zip_of([("cat/huge.png", b"\0" * (9 << 20)), ("dog/a.png", png(1))], zipfile.ZIP_DEFLATED)


def zip_symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("cat/link.png")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
        for i in range(20):
            zf.writestr(f"dog/{i}.png", png(i))
    return buf.getvalue()


def corrupt_zip_member() -> bytes:
    raw = bytearray(zip_of([(name, data) for name, data, _ in two_classes()]))
    raw[raw.index(b"IHDR") + 8] ^= 0xFF  # the first member's bytes no longer match its CRC
    return bytes(raw)


def truncated_tar_gz() -> bytes:
    data = tar(two_classes(), mode="w:gz")
    return data[: len(data) // 2]


def many_classes() -> bytes:
    one = png(3)
    return zip_of([(f"c{c}/a.png", one) for c in range(1001)])


def digits_x(n: int = 40) -> np.ndarray:
    return np.zeros((n, 8, 8), np.uint8)


def _http(method: str, path: str, **kwargs: Any) -> Callable[[Target], tuple[str, str]]:
    def send(t: Target) -> tuple[str, str]:
        import httpx

        r = httpx.request(method, t.http + path.format(task=t.task, pending=t.pending), timeout=120, **kwargs)
        try:
            text = r.json().get("error", r.text)
        except (ValueError, AttributeError):
            text = r.text
        return str(r.status_code), str(text)
    return send


def _upload(body: Callable[[], bytes], name: str | None = "", token: str | None = TOKEN,
            **params: str) -> Callable[[Target], tuple[str, str]]:
    """An upload of ``body()``; ``name`` "" means a name of its own per call (``bad_<n>``)."""
    def send(t: Target) -> tuple[str, str]:
        query = {**({"name": name or f"bad_{next(_names)}"} if name is not None else {}), **params}
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return _http("POST", "/v1/tasks", params=query, content=body(), headers=headers)(t)
    return send


_names = itertools.count()


def _streamed_upload(size: int) -> Callable[[Target], tuple[str, str]]:
    """An upload sent chunked (no Content-Length), ``size`` bytes in all."""
    def chunks() -> Any:
        for _ in range(size // (64 << 10)):
            yield b"x" * (64 << 10)

    def send(t: Target) -> tuple[str, str]:
        return _http("POST", "/v1/tasks", params={"name": "streamed"}, content=chunks(),
                     headers={"Authorization": f"Bearer {TOKEN}"})(t)
    return send


def _raw_http(request: bytes) -> Callable[[Target], tuple[str, str]]:
    """A hand-written HTTP/1.1 request (for what an HTTP client library refuses to send)."""
    def send(t: Target) -> tuple[str, str]:
        host, port = t.http.split("//")[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(request)
            answer = b""
            while True:  # the whole answer: the server closes the connection after a refused request
                part = s.recv(65536)
                if not part:
                    break
                answer += part
        status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
        return (status_line.split()[1] if len(status_line.split()) > 1 else "none"), answer.decode("latin-1")[-300:]
    return send


def _classify(body: bytes | None = None, *, task: str = "{task}", params: dict[str, str] | None = None,
              json_body: Any = None) -> Callable[[Target], tuple[str, str]]:
    kwargs: dict[str, Any] = {"params": params or {}}
    if json_body is not None:
        kwargs["json"] = json_body
    else:
        kwargs["content"] = png() if body is None else body
    return _http("POST", f"/v1/tasks/{task}/classify", **kwargs)


def _infer(doc: Any, *, model: str = "{task}", headers: dict[str, str] | None = None,
           tail: bytes = b"") -> Callable[[Target], tuple[str, str]]:
    body = json.dumps(doc).encode() + tail
    return _http("POST", f"/v2/models/{model}/infer", content=body,
                 headers={"content-type": "application/json", **(headers or {})})


def _grpc(method: str, make: Callable[[Any, Target], Any]) -> Callable[[Target], tuple[str, str]]:
    def send(t: Target) -> tuple[str, str]:
        import grpc

        from mu2net_client._proto import mu2net_pb2 as pb
        from mu2net_client._proto import mu2net_pb2_grpc as pbgrpc

        with grpc.insecure_channel(t.grpc, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            try:
                getattr(pbgrpc.Mu2NetStub(ch), method)(make(pb, t), timeout=60)
            except grpc.RpcError as e:
                return e.code().name, e.details() or ""
        return "OK", ""
    return send


def _model_infer(make: Callable[[Any, Target], Any]) -> Callable[[Target], tuple[str, str]]:
    """Sends one Open Inference Protocol ``ModelInfer`` over gRPC (tritonclient's message
    classes, so this process registers none of the server's own)."""
    def send(t: Target) -> tuple[str, str]:
        import grpc
        from tritonclient.grpc import service_pb2 as kpb
        from tritonclient.grpc import service_pb2_grpc as kgrpc

        with grpc.insecure_channel(t.grpc) as ch:
            try:
                kgrpc.GRPCInferenceServiceStub(ch).ModelInfer(make(kpb, t), timeout=60)
            except grpc.RpcError as e:
                return e.code().name, e.details() or ""
        return "OK", ""
    return send


def _infer_with_timeout(kpb: Any, t: Target, timeout: Any) -> Any:
    """A valid one-image ModelInfer request whose ``timeout`` parameter is ``timeout``:
    an int (int64_param) or a string (string_param)."""
    req = kpb.ModelInferRequest(model_name=t.task, inputs=[kpb.ModelInferRequest.InferInputTensor(
        name="IMAGE", datatype="UINT8", shape=[1, 8, 8, 1])], raw_input_contents=[bytes(64)])
    if isinstance(timeout, str):
        req.parameters["timeout"].string_param = timeout
    else:
        req.parameters["timeout"].int64_param = timeout
    return req


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _cases() -> list[Case]:
    u, c, o, g, a = "HTTP upload", "HTTP classify", "OIP REST", "gRPC", "HTTP admin"
    one_image = [{"name": "x", "datatype": "UINT8", "shape": [1, 8, 8, 1], "data": [0] * 64}]  # OIP input
    raw = lambda pb, t, shape, size: pb.ClassifyRequest(task=t.task, raw=pb.RawTensor(shape=shape, data=b"\0" * size))  # noqa: E731
    return [
        # uploads: decoding guards
        Case("huge_class_id", u, ".npz whose y_train holds a label id of 10**15", "400",
             "label ids span [0, 1000000000000000]",
             _upload(lambda: npz(x_train=digits_x(), y_train=np.array([0] * 39 + [10 ** 15], np.int64)))),
        Case("npz_decode_bomb", u, ".npz of a few KB whose arrays decode past the archive cap", "400",
             "decode to more than", _upload(lambda: npz(x_train=np.zeros((40, 512, 512), np.uint8),
                                                        y_train=np.zeros(40, np.int64)))),
        Case("npz_empty", u, ".npz with 0 training examples", "400", "no labelled examples",
             _upload(lambda: npz(x_train=digits_x(0), y_train=np.zeros(0, np.int64)))),
        Case("npz_no_arrays", u, ".npz without any array", "400", "no class folders", _upload(lambda: npz())),
        Case("npz_pickled_object", u, ".npz holding a pickled object array", "400", "allow_pickle",
             _upload(lambda: npz(x_train=np.array([{"a": 1}] * 40, dtype=object), y_train=np.zeros(40, np.int64)))),
        Case("npz_wrong_keys", u, ".npz with keys other than x_/y_ train/val/test", "400", "required x_train",
             _upload(lambda: npz(images=digits_x(), labels=np.zeros(40, np.int64)))),
        Case("npz_length_mismatch", u, ".npz with 40 images and 39 labels", "400", "matching x_train",
             _upload(lambda: npz(x_train=digits_x(), y_train=np.zeros(39, np.int64)))),
        Case("npz_negative_label", u, ".npz with a label id of -1", "400", "label ids span [-1",
             _upload(lambda: npz(x_train=digits_x(), y_train=np.array([-1] + [0] * 39, np.int64)))),
        Case("npz_pixels_out_of_range", u, ".npz of float pixels up to 300", "400", "outside 0..255",
             _upload(lambda: npz(x_train=np.full((40, 8, 8), 300.0), y_train=np.arange(40) % 2))),
        Case("npz_nan_pixels", u, ".npz of float pixels that are NaN", "400", "not finite",
             _upload(lambda: npz(x_train=np.full((40, 8, 8), np.nan), y_train=np.arange(40) % 2))),
        Case("npz_inf_pixels", u, ".npz of float pixels that are +inf", "400", "not finite",
             _upload(lambda: npz(x_train=np.full((40, 8, 8), np.inf), y_train=np.arange(40) % 2))),
        Case("npz_zero_size_images", u, ".npz of 0x8 images", "400", "allowed: 1 to",
             _upload(lambda: npz(x_train=np.zeros((40, 0, 8), np.uint8), y_train=np.arange(40) % 2))),
        Case("npz_5d_images", u, ".npz of [N,H,W,C,1] images", "400", "allowed: [N,H,W]",
             _upload(lambda: npz(x_train=np.zeros((40, 8, 8, 1, 1), np.uint8), y_train=np.arange(40) % 2))),
        Case("npz_truncated", u, ".npz cut short", "400", "nor an npz file",
             _upload(lambda: npz(x_train=digits_x(), y_train=np.arange(40) % 2)[:-30])),
        Case("npz_negative_shape", u, ".npz member whose .npy header declares a shape of -10**12", "400",
             "sizes must be >= 0", _upload(lambda: raw_npz({"label_names": ((-10 ** 12,), "<i8"),
                                                            "x_train": ((40, 8, 8), "|u1"), "y_train": ((40,), "<i8")}))),
        Case("npz_huge_shape", u, ".npz member whose .npy header declares 10**400 elements", "400", "decode to more than",
             _upload(lambda: raw_npz({"x_train": ((10 ** 400,), "|u1"), "y_train": ((40,), "<i8")}))),
        Case("npz_scalar_label_names", u, ".npz whose label_names is a 0-d array", "400", "label_names has shape []",
             _upload(lambda: npz(x_train=digits_x(), y_train=np.arange(40) % 2, label_names=np.array(5)))),
        Case("npz_repeated_label_names", u, ".npz whose label_names repeat", "400", "are repeated",
             _upload(lambda: npz(x_train=digits_x(), y_train=np.arange(40) % 2, label_names=np.array(["a", "a"])))),
        Case("npz_multiline_label_name", u, ".npz with a label name holding a line break", "400", "line break",
             _upload(lambda: npz(x_train=digits_x(), y_train=np.arange(40) % 2, label_names=np.array(["a\nb", "c"])))),
        Case("zip_encrypted_member", u, "zip whose member is flagged encrypted", "400", "corrupt or unsupported",
             _upload(encrypted_zip)),
        Case("corrupt_tar_xz", u, ".tar.xz with damaged compressed data", "400", "damaged", _upload(corrupt_tar_xz)),
        Case("deep_single_folders", u, "300 nested single folders around the images", "400", "at least 2",
             _upload(lambda: tar([("d/" * 300 + name, data, kind) for name, data, kind in two_classes()]))),
        Case("zip_bomb", u, "zip whose member inflates past the archive cap", "400", "zip bomb", _upload(zip_bomb)),
        Case("pixel_bomb", u, "8000x8000 PNG (64 M pixels, a few KB) in a zip", "400", "8000x8000; at most",
             _upload(lambda: zip_of([("a/big.png", big_png())] + [(n, d) for n, d, _ in two_classes()]))),
        Case("png_header_bomb", u, "PNG whose header claims 100000x100000 pixels, in a zip", "400", "too large to decode",
             _upload(lambda: zip_of([("a/huge.png", header_bomb_png())] + [(n, d) for n, d, _ in two_classes()]))),
        Case("truncated_tar_gz", u, ".tar.gz cut in half", "400", "truncated or corrupt", _upload(truncated_tar_gz)),
        Case("corrupt_zip_member", u, "zip whose member fails its CRC", "400", "corrupt", _upload(corrupt_zip_member)),
        Case("traversal", u, "tar member ../../evil.png", "400", "parent path",
             _upload(lambda: tar([("../../evil.png", png(1), "file")] + two_classes()))),
        Case("absolute_path", u, "zip member /etc/evil.png", "400", "absolute",
             _upload(lambda: zip_of([("/etc/evil.png", png(1))] + [(n, d) for n, d, _ in two_classes()]))),
        Case("tar_symlink", u, "tar symlink to /etc/passwd", "400", "link",
             _upload(lambda: tar([("a/x.png", b"", "sym")] + two_classes()))),
        Case("tar_hardlink", u, "tar hard link to /etc/passwd", "400", "link",
             _upload(lambda: tar([("a/x.png", b"", "hard")] + two_classes()))),
        Case("tar_fifo", u, "tar holding a FIFO", "400", "not a regular file",
             _upload(lambda: tar([("a/x.png", b"", "fifo")] + two_classes()))),
        Case("zip_symlink", u, "zip member that is a symlink", "400", "symlink", _upload(zip_symlink)),
        Case("non_image", u, "a .txt file in a class folder", "400", "not an image",
             _upload(lambda: tar([("a/notes.txt", b"hello", "file")] + two_classes()))),
        Case("corrupt_image", u, "a .png that is not an image", "400", "not a decodable image",
             _upload(lambda: tar([("a/bad.png", b"\x89PNG but not really", "file")] + two_classes()))),
        Case("stray_file", u, "an image outside any class folder", "400", "outside a class folder",
             _upload(lambda: tar([("loose.png", png(1), "file")] + two_classes()))),
        Case("garbage", u, "bytes that are no archive", "400", "neither a zip nor a tar",
             _upload(lambda: b"this is not an archive")),
        Case("empty_body", u, "an empty body", "400", "empty body", _upload(lambda: b"")),
        # uploads: degenerate datasets
        Case("single_class", u, "40 images of one class", "400", "at least 2",
             _upload(lambda: tar([(f"cat/{i}.png", png(i), "file") for i in range(40)]))),
        Case("too_few_images", u, "2 classes x 4 images", "400", "at least 10",
             _upload(lambda: tar(two_classes(4)))),
        Case("too_many_classes", u, "1001 class folders", "400", "at most 1000", _upload(many_classes)),
        # uploads: names, tokens, parameters, limits
        Case("bad_task_name", u, "task name ../etc", "400", "task name", _upload(lambda: tar(two_classes()), "../etc")),
        Case("long_task_name", u, "task name of 65 characters", "400", "task name",
             _upload(lambda: tar(two_classes()), "x" * 65)),
        Case("duplicate_task", u, "a task name in use", "409", "already exists",
             lambda t: _upload(lambda: tar(two_classes()), t.task)(t)),
        Case("missing_name", u, "no ?name=", "400", "missing query parameter 'name'",
             _upload(lambda: tar(two_classes()), None)),
        Case("bad_private", u, "?private=maybe", "400", "private='maybe'",
             _upload(lambda: tar(two_classes()), private="maybe")),
        Case("no_token", u, "no bearer token", "401", "admin bearer token", _upload(lambda: tar(two_classes()), token=None)),
        Case("wrong_token", u, "a wrong bearer token", "401", "admin bearer token", _upload(lambda: tar(two_classes()), token="guess")),
        Case("over_upload_limit", u, "Content-Length of 5 MiB (limit 4 MiB)", "413", "exceeds the upload limit",
             _upload(lambda: b"x" * (5 << 20))),
        Case("over_upload_limit_streamed", u, "5 MiB sent chunked, without Content-Length", "413",
             "exceeds the upload limit", _streamed_upload(5 << 20)),
        Case("bad_content_length", u, "Content-Length: abc (refused by uvicorn's HTTP parser)", "400",
             "Invalid HTTP request",
             _raw_http(b"POST /v1/tasks?name=x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n"
                       b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")),
        # HTTP classify
        Case("top_k_not_an_integer", c, "?top_k=abc", "400", "top_k='abc' is not an integer",
             _classify(params={"top_k": "abc"})),
        Case("top_k_negative", c, "?top_k=-1", "400", "top_k=-1", _classify(params={"top_k": "-1"})),
        Case("top_k_above_classes", c, "?top_k=11 on 10 classes", "400", "top_k=11", _classify(params={"top_k": "11"})),
        Case("top_k_huge", c, "?top_k=10**20", "400", "top_k=", _classify(params={"top_k": str(10 ** 20)})),
        Case("timeout_not_a_number", c, "?timeout_ms=soon", "400", "timeout_ms='soon'",
             _classify(params={"timeout_ms": "soon"})),
        Case("timeout_negative", c, "?timeout_ms=-5", "400", "timeout_ms='-5'", _classify(params={"timeout_ms": "-5"})),
        Case("timeout_zero", c, "?timeout_ms=0", "400", "timeout_ms='0'", _classify(params={"timeout_ms": "0"})),
        Case("timeout_nan", c, "?timeout_ms=nan", "400", "timeout_ms='nan'", _classify(params={"timeout_ms": "nan"})),
        Case("timeout_infinite", c, "?timeout_ms=inf", "400", "timeout_ms='inf'", _classify(params={"timeout_ms": "inf"})),
        Case("json_list_body", c, "a JSON list body", "400", "JSON classify body is a list", _classify(json_body=[1, 2])),
        Case("json_bad_base64", c, "images that are not base64", "400", "bad JSON classify body",
             _classify(json_body={"images": ["!!not base64!!"]})),
        Case("json_top_k_string", c, "top_k of \"x\" in the JSON body", "400", "bad JSON classify body",
             _classify(json_body={"images": [_b64(png())], "top_k": "x"})),
        Case("json_raw_size_mismatch", c, "raw tensor [1,8,8,1] with 10 bytes", "400", "does not match its 10 bytes",
             _classify(json_body={"raw": {"shape": [1, 8, 8, 1], "data": _b64(b"\0" * 10)}})),
        Case("json_raw_negative_shape", c, "raw tensor of shape [-1,8,8,1] (numpy would infer the -1)", "400",
             "[-1, 8, 8, 1] does not match",
             _classify(json_body={"raw": {"shape": [-1, 8, 8, 1], "data": _b64(b"\0" * 64)}})),
        Case("json_raw_huge_shape", c, "raw tensor claiming [10**6,4096,4096,3] over 64 bytes", "400", "does not match",
             _classify(json_body={"raw": {"shape": [10 ** 6, 4096, 4096, 3], "data": _b64(b"\0" * 64)}})),
        Case("not_an_image", c, "bytes that are no image", "400", "not a decodable image",
             _classify(b"definitely not an image")),
        Case("classify_pixel_bomb", c, "8000x8000 PNG", "400", "8000x8000", _classify(big_png())),
        Case("classify_header_bomb", c, "PNG claiming 100000x100000", "400", "too large to decode",
             _classify(header_bomb_png())),
        Case("classify_empty_body", c, "an empty body", "400", "(0 bytes) is not a decodable image", _classify(b"")),
        Case("classify_over_message_limit", c, "2 MiB body (limit 1 MiB)", "413", "limit",
             _classify(b"x" * (2 << 20))),
        Case("classify_too_many_images", c, "8193 images in one request", "400", "at most 8192",
             _classify(json_body={"images": [_b64(png())] * 8193})),
        Case("classify_unknown_task", c, "an unknown task", "404", "unknown task 'nope'", _classify(task="nope")),
        Case("classify_pending_task", c, "a task without a served path", "503", "no served path",
             _classify(task="{pending}")),
        # Open Inference Protocol REST
        Case("oip_json_list", o, "a JSON list request", "400", "JSON list", _infer([1, 2])),
        Case("oip_bad_data", o, "UINT8 input whose data are strings", "400", "malformed inference request",
             _infer({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 8, 8, 1], "data": ["x"]}]})),
        Case("oip_inputs_not_a_list", o, "\"inputs\": 7", "400", "malformed inference request", _infer({"inputs": 7})),
        Case("oip_header_length_out_of_range", o, "Inference-Header-Content-Length past the body", "400", "outside",
             _infer({"inputs": []}, headers={"Inference-Header-Content-Length": "999999"})),
        Case("oip_unknown_model", o, "a valid inference request to an unknown model", "404", "unknown task 'nope'",
             _infer({"inputs": one_image}, model="nope")),
        Case("oip_uint8_huge_shape", o, "UINT8 input claiming [2**32,2**32,1,1] over 64 values (wraps in int64)", "400",
             "does not match",
             _infer({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [2 ** 32, 2 ** 32, 1, 1], "data": [0] * 64}]})),
        Case("oip_timeout_negative", o, "parameters.timeout of -1 (microseconds)", "400", "parameters.timeout=-1",
             _infer({"parameters": {"timeout": -1}, "inputs": one_image})),
        Case("oip_timeout_fractional", o, "parameters.timeout of 1.5 (an int64 of microseconds)", "400",
             "parameters.timeout=1.5", _infer({"parameters": {"timeout": 1.5}, "inputs": one_image})),
        Case("oip_timeout_string", o, "parameters.timeout of \"soon\"", "400", "parameters.timeout='soon'",
             _infer({"parameters": {"timeout": "soon"}, "inputs": one_image})),
        Case("oip_bad_datatype", o, "an FP64 input", "400", "allowed: UINT8",
             _infer({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 8, 8, 1], "data": [0.5] * 64}]})),
        # gRPC
        Case("grpc_unknown_task", g, "Classify of an unknown task", "NOT_FOUND", "'nope'",
             _grpc("Classify", lambda pb, t: pb.ClassifyRequest(task="nope", encoded_images=[png()]))),
        Case("grpc_not_an_image", g, "Classify of bytes that are no image", "INVALID_ARGUMENT", "not a decodable image",
             _grpc("Classify", lambda pb, t: pb.ClassifyRequest(task=t.task, encoded_images=[b"nope"]))),
        Case("grpc_pixel_bomb", g, "Classify of an 8000x8000 PNG", "INVALID_ARGUMENT", "8000x8000",
             _grpc("Classify", lambda pb, t: pb.ClassifyRequest(task=t.task, encoded_images=[big_png()]))),
        Case("grpc_raw_rank_3", g, "raw tensor of shape [1,8,8]", "INVALID_ARGUMENT", "[1, 8, 8] does not match",
             _grpc("Classify", lambda pb, t: raw(pb, t, [1, 8, 8], 64))),
        Case("grpc_raw_negative_shape", g, "raw tensor of shape [-1,8,8,-1]", "INVALID_ARGUMENT",
             "[-1, 8, 8, -1] does not match", _grpc("Classify", lambda pb, t: raw(pb, t, [-1, 8, 8, -1], 64))),
        Case("grpc_raw_size_mismatch", g, "raw tensor [2,8,8,1] with 64 bytes", "INVALID_ARGUMENT",
             "[2, 8, 8, 1] does not match", _grpc("Classify", lambda pb, t: raw(pb, t, [2, 8, 8, 1], 64))),
        Case("grpc_raw_huge_shape", g, "raw tensor claiming [2**31,2**31,1,1] over 64 bytes", "INVALID_ARGUMENT",
             "[2147483648, 2147483648, 1, 1] does not match",
             _grpc("Classify", lambda pb, t: raw(pb, t, [2 ** 31, 2 ** 31, 1, 1], 64))),
        Case("grpc_top_k_above_classes", g, "top_k=11 on 10 classes", "INVALID_ARGUMENT", "top_k=11",
             _grpc("Classify", lambda pb, t: pb.ClassifyRequest(task=t.task, encoded_images=[png()], top_k=11))),
        Case("grpc_no_images", g, "Classify with neither images nor a raw tensor", "INVALID_ARGUMENT", "exactly one",
             _grpc("Classify", lambda pb, t: pb.ClassifyRequest(task=t.task))),
        Case("grpc_over_message_limit", g, "a 1.1 MiB message (limit 1 MiB)", "RESOURCE_EXHAUSTED", "larger than max",
             _grpc("Classify", lambda pb, t: raw(pb, t, [1, 1024, 1100, 1], 1024 * 1100))),
        Case("grpc_infer_timeout_negative", g, "ModelInfer with parameters.timeout of -1", "INVALID_ARGUMENT",
             "parameters.timeout=-1", _model_infer(lambda kpb, t: _infer_with_timeout(kpb, t, -1))),
        Case("grpc_infer_timeout_string", g, "ModelInfer with a string parameters.timeout", "INVALID_ARGUMENT",
             "parameters.timeout='soon'", _model_infer(lambda kpb, t: _infer_with_timeout(kpb, t, "soon"))),
        Case("grpc_get_unknown_task", g, "GetTask of an unknown task", "NOT_FOUND", "'nope'",
             _grpc("GetTask", lambda pb, t: pb.GetTaskRequest(name="nope"))),
        # admin routes
        Case("delete_unknown_task", a, "DELETE of an unknown task", "404", "unknown task 'nope'",
             _http("DELETE", "/v1/tasks/nope", headers={"Authorization": f"Bearer {TOKEN}"})),
        Case("delete_without_token", a, "DELETE without a token", "401", "admin bearer token", _http("DELETE", "/v1/tasks/{task}")),
        Case("evolve_unknown_task", a, "POST evolve of an unknown task", "404", "unknown task 'nope'",
             _http("POST", "/v1/tasks/nope/evolve", headers={"Authorization": f"Bearer {TOKEN}"})),
        Case("unknown_route", a, "GET /v1/nothing", "404", "no route GET /v1/nothing", _http("GET", "/v1/nothing")),
        Case("wrong_method", a, "PUT /v1/tasks", "405", "no route PUT /v1/tasks", _http("PUT", "/v1/tasks")),
    ]


#: The catalogue (see the module docstring).
CASES = _cases()


def store_state(store: Any, upload_dir: Path | None = None) -> tuple[Any, ...]:
    """What a rejected request must leave unchanged: tasks (name, state, served path), the
    system version, and the files under ``datasets/``, ``arrays/`` and the upload spool."""
    root = Path(store.data_dir)
    files = tuple(sorted(str(p.relative_to(root)) for d in ("datasets", "arrays") if (root / d).exists()
                         for p in (root / d).rglob("*")))
    spool = tuple(sorted(p.name for p in upload_dir.iterdir())) if upload_dir is not None else ()
    tasks = tuple((t.name, t.state, getattr(store.best_path(t.name), "id", None)) for t in store.list_tasks())
    return tasks, store.system_version(), files, spool


def alive(t: Target) -> bool:
    """The server answers its liveness route and classifies a valid image."""
    import httpx

    try:
        live = httpx.get(t.http + "/v2/health/live", timeout=30).status_code == 200
        ok = httpx.post(f"{t.http}/v1/tasks/{t.task}/classify", content=png(), timeout=60).status_code == 200
    except httpx.HTTPError:
        return False
    return live and ok


def run_case(case: Case, t: Target, store: Any, upload_dir: Path | None = None) -> dict[str, Any]:
    """Sends one case; returns its row (``passed`` when status, message, store and liveness
    all hold)."""
    before = store_state(store, upload_dir)
    t0 = time.perf_counter()
    try:
        status, message = case.send(t)
    except Exception as e:  # the server closed the connection, or the client refused to send
        status, message = "no answer", f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    unchanged = store_state(store, upload_dir) == before
    up = alive(t)
    return {"kind": case.kind, "api": case.api, "what": case.what, "expect": case.expect, "status": status,
            "message": message[:200], "message_ok": case.match in message, "store_unchanged": unchanged,
            "server_alive": up, "seconds": round(seconds, 3),
            "passed": status == case.expect and case.match in message and unchanged and up}


def build_store(data_dir: Path) -> Any:
    """A new store with a tiny random root, ``digits`` (sklearn digits, trained by one short
    active phase) and ``pending`` (queued, never trained)."""
    from sklearn.datasets import load_digits

    from mu2net import components as C
    from mu2net import root as R
    from mu2net.evolver import Evolver, EvolverConfig, TrainBudget
    from mu2net.ingest import add_task_arrays
    from mu2net.root import init_root
    from mu2net.store import Store

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[:600, :, :, None]
    y = d.target[:600].astype(np.int64)
    splits = {"train": (x[:420], y[:420]), "validation": (x[420:510], y[420:510]), "test": (x[510:], y[510:])}
    store = Store(data_dir)
    arch, params = R.random_root(C.ViTConfig(image_size=8, patch_size=4, width=16, mlp_dim=32, num_heads=2), 0, seed=0)
    init_root(store, arch, params, {"mu": 0.3, "learning_rate": 0.05, "flip": False, "crop": False})
    add_task_arrays(store, "digits", splits, [str(i) for i in range(10)], source="hostile")
    add_task_arrays(store, "pending", {k: (a, b % 2) for k, (a, b) in splits.items()}, ["even", "odd"],
                    source="hostile")
    config = EvolverConfig(generations=2, children=2, budget=TrainBudget(cycles=2, sample_cap=256, batch_size=32))
    Evolver(store, config, progress=False).active_phase("digits")
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from mu2net.server.launcher import RunningServer
    from report import write_json

    data = Path(tempfile.mkdtemp(prefix="mu2net-hostile-")) / "store"
    store = build_store(data)
    server = RunningServer(str(data), ["--no-evolver", "--quiet", *SERVER_LIMITS])
    target = Target(server.http, server.grpc)
    rows = []
    try:
        spool = [p for p in data.iterdir() if p.name.startswith("uploads-")]
        for case in CASES:
            row = run_case(case, target, store, spool[0] if spool else None)
            rows.append(row)
            print(f"{'ok  ' if row['passed'] else 'FAIL'} {case.kind:34s} {row['status']:>18s}  {row['message'][:90]}",
                  flush=True)
        exit_code = server.stop()
    finally:
        if server.proc.poll() is None:
            server.stop()
        store.close()
    passed = sum(r["passed"] for r in rows)
    print(f"{passed} of {len(rows)} hostile inputs answered as expected, store unchanged, server alive; "
          f"clean exit {exit_code == 0}", flush=True)
    if args.out:
        write_json({"cases": rows, "passed": passed, "total": len(rows), "server_exit_code": exit_code}, args.out)


if __name__ == "__main__":
    main()

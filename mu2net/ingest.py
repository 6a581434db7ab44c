"""Task ingestion: a dataset source read, validated, stored as a TFDS dataset and queued
as a task in the store (docs/design.md, "Ingestion": upload -> TFDS dataset -> task row).

Sources (``SOURCE`` in ``mu2net serve|evolve --task NAME=SOURCE``; an HTTP upload's body is
the first or second kind):

* ``path/to/file.npz`` with ``x_train``, ``y_train`` and optionally ``x_val``, ``y_val``,
  ``x_test``, ``y_test``, ``label_names``; images ``[N,H,W]`` or ``[N,H,W,C]``
  uint8;
* an ImageFolder directory or ``.zip``/``.tar[.gz]`` archive, ``<label>/<file>`` or
  ``<split>/<label>/<file>`` (split: train, validation or val, test);
* ``builtin:NAME`` for the real datasets installed with the package's dependencies
  (:data:`mu2net.datasets.BUILTINS`).

Decoding with its size guards is :mod:`mu2net.archives`; the split rules and TFDS storage
are :mod:`mu2net.datasets`. The server and the CLI ingest through here; the evolver only
reads the stored tasks.
"""

from __future__ import annotations

import shutil
from pathlib import Path as FsPath

from mu2net import archives as A
from mu2net import datasets as D
from mu2net.store import Store, TaskExists, TaskRecord, fsync_tree, new_id


def load_source(source: str) -> tuple[D.ArraySplits, list[str]]:
    """Reads a source string (see the module docstring) into arrays and label names.

    Raises:
      DatasetError: unreadable or malformed data, naming the problem.
      DatasetUnavailable: a built-in dataset is not installed here.
    """
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in D.BUILTINS:
            raise D.DatasetError(f"unknown built-in dataset {name!r}; allowed: {sorted(D.BUILTINS)}")
        return D.BUILTINS[name]()
    path = FsPath(source)
    if not path.exists():
        raise D.DatasetError(f"dataset source {source!r} does not exist; give an .npz file, an "
                           f"ImageFolder directory or archive, or builtin:NAME with NAME in {sorted(D.BUILTINS)}")
    if path.is_dir():
        return A.load_image_folder(path)
    return A.load_dataset_file(path)


def add_task(store: Store, name: str, source: str, *, private: bool = False,
             acl_group: str | None = None) -> TaskRecord:
    """Reads a dataset source, stores it as a TFDS dataset and queues the task.

    Raises:
      DatasetError: invalid name or data (message names the problem).
      TaskExists: a task of that name exists (nothing is changed).
    """
    D.validate_task_name(name)
    splits, names = load_source(source)
    return add_task_arrays(store, name, splits, names, source=source, private=private, acl_group=acl_group)


def add_task_arrays(store: Store, name: str, splits: D.ArraySplits, label_names: list[str], *,
                    source: str, private: bool = False, acl_group: str | None = None) -> TaskRecord:
    """Like :func:`add_task` for arrays already in memory (an upload decoded by
    :mod:`mu2net.archives`).

    The dataset files are written and fsynced before the task row that points to them
    commits; if the row cannot be added, they are removed again.

    Args:
      splits: split name -> (images ``[N,H,W,C] uint8``, labels ``[N] int64``).
      label_names: one name per class id.
      source: what the data came from (recorded on the task).

    Raises:
      DatasetError: invalid name or data (message names the problem).
      TaskExists: a task of that name exists (nothing is changed).
    """
    D.validate_task_name(name)
    if any(t.name == name for t in store.list_tasks()):
        raise TaskExists(f"task {name!r} already exists")
    stored, exprs = D.finalize_splits(splits, label_names)
    ds_root = store.data_dir / "datasets" / f"{name}-{new_id()[:8]}"
    try:
        dataset_dir = D.write_tfds(stored, label_names, ds_root)
        fsync_tree(ds_root)  # on disk before the task row that points to it commits
        record = TaskRecord(
            name=name, private=private, acl_group=(acl_group or name) if private else None,
            label_names=tuple(label_names), image_shape=tuple(next(iter(stored.values()))[0].shape[1:]),
            num_examples={k: len(v[1]) for k, v in stored.items()}, splits=exprs,
            dataset_dir=dataset_dir, source=source)
        return store.add_task(record)
    except BaseException:
        shutil.rmtree(ds_root, ignore_errors=True)
        raise

"""mu2net: a multitask image classifier that keeps learning (mu2Net, Gesmundo & Dean 2022).

Public names: the ViT components, paths and their forward function, the store and the
Table 1 search space. The evolver lives in :mod:`mu2net.evolver`.
"""

from mu2net.components import ViTConfig
from mu2net.hparams import DEFAULTS, SEARCH_SPACE
from mu2net.paths import Architecture, Path, accuracy, forward, predict, preprocess
from mu2net.store import ComponentRecord, ComponentsGone, Store, StoreError, TaskExists, TaskNotFound, TaskRecord

__all__ = [
    "ViTConfig", "DEFAULTS", "SEARCH_SPACE", "Architecture", "Path", "accuracy", "forward", "predict",
    "preprocess", "ComponentRecord", "ComponentsGone", "Store", "StoreError", "TaskExists", "TaskNotFound", "TaskRecord",
]

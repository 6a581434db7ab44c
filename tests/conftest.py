"""Shared fixtures: tiny ViT configs and real (sklearn digits) data."""

from __future__ import annotations

import numpy as np
import pytest

from mu2net import components as C
from mu2net import root as R
from mu2net.evolver import EvolverConfig, TrainBudget
from mu2net.ingest import add_task_arrays
from mu2net.root import init_root
from mu2net.store import Store

TINY = C.ViTConfig(image_size=8, patch_size=4, width=16, mlp_dim=32, num_heads=2)
TINY_EVOLVER = EvolverConfig(generations=2, children=2, budget=TrainBudget(cycles=2, sample_cap=256, batch_size=32),
                             seed=0)


def digits_splits(transform=lambda y: y, limit: int = 600) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Real sklearn digits images (8x8 gray, uint8) with a label transform."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[:limit, :, :, None]
    y = transform(d.target[:limit]).astype(np.int64)
    n = len(x)
    return {"train": (x[: n * 7 // 10], y[: n * 7 // 10]), "validation": (x[n * 7 // 10: n * 85 // 100], y[n * 7 // 10: n * 85 // 100]),
            "test": (x[n * 85 // 100:], y[n * 85 // 100:])}


@pytest.fixture
def tiny_store(tmp_path) -> Store:
    """A store with a tiny random root (no blocks) and three digits-derived tasks."""
    store = Store(tmp_path / "store")
    arch, params = R.random_root(TINY, num_blocks=0, seed=0)
    init_root(store, arch, params, {"mu": 0.3, "learning_rate": 0.05, "flip": False, "crop": False})
    add_task_arrays(store, "digits", digits_splits(), [str(i) for i in range(10)], source="test")
    add_task_arrays(store, "parity", digits_splits(lambda y: y % 2), ["even", "odd"], source="test",
                    private=True)
    add_task_arrays(store, "small", digits_splits(lambda y: (y >= 5).astype(int)), ["lt5", "ge5"], source="test")
    yield store
    store.close()

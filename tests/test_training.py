"""Train step: frozen components untouched, compile cache by architecture signature."""

import jax
import numpy as np
import pytest

from conftest import TINY
from mu2net import hparams as H
from mu2net import paths as P
from mu2net import root as R
from mu2net.evolver.training import TrainBudget, cosine_with_warmup, train_child, train_step_fn


def _data(n=64, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8), rng.integers(0, classes, n).astype(np.int32)


@pytest.mark.parametrize("mask", [(False, False, False, False, True, True), (False, False, True, False, True, True),
                                  (True, False, False, True, False, True)])
def test_frozen_components_are_not_modified_and_trainable_ones_are(mask):
    arch, params = R.random_root(TINY, num_blocks=2, seed=0, num_classes=3)
    before = jax.device_get(params)
    res = train_child(arch, params, [None] * 6, mask, H.with_defaults({"learning_rate": 0.1}), _data(), _data(32),
                      TrainBudget(1, 64, 32), lambda a, p: a, seed=0)
    trainable = {i for i, m in enumerate(mask) if m}
    assert set(res.params) == trainable
    for i in range(6):  # the caller's arrays are never modified
        for a, b in zip(jax.tree_util.tree_leaves(before[i]), jax.tree_util.tree_leaves(params[i])):
            np.testing.assert_array_equal(a, b)
    for i in trainable:
        changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before[i]),
                                                               jax.tree_util.tree_leaves(res.params[i]))]
        assert any(changed), i
    assert res.steps == 2 and 0.0 <= res.validation_accuracy <= 1.0


def test_same_structure_child_does_not_recompile():
    arch, params = R.random_root(TINY, num_blocks=1, seed=3, num_classes=3)
    mask = (False, False, True, False, True)
    hp1 = H.with_defaults({"learning_rate": 0.1})
    hp2 = H.with_defaults({"learning_rate": 0.02, "momentum": 0.95, "crop": False, "hue": 0.1})
    train_child(arch, params, [None] * 5, mask, hp1, _data(), _data(32), TrainBudget(1, 64, 32), lambda a, p: a, 0)
    before_train, before_predict = P.TRACES.counts.get("train_step", 0), P.TRACES.counts.get("predict", 0)
    _, params2 = R.random_root(TINY, num_blocks=1, seed=4, num_classes=3)
    train_child(arch, params2, [None] * 5, mask, hp2, _data(seed=1), _data(32, seed=2), TrainBudget(2, 64, 32),
                lambda a, p: a, 1)
    assert P.TRACES.counts["train_step"] == before_train  # new hyperparameters, same structure: no retrace
    assert P.TRACES.counts["predict"] == before_predict
    assert train_step_fn(arch, 2, False) is train_step_fn(arch, 2, False)
    # a child cloning other upper components (same lowest trainable position) shares the step too
    train_child(arch, params2, [None] * 5, (False, False, True, True, True), hp2, _data(seed=1), _data(32, seed=2),
                TrainBudget(1, 64, 32), lambda a, p: a, 2)
    assert P.TRACES.counts["train_step"] == before_train


def test_no_gradient_is_computed_below_the_lowest_trainable_component():
    arch, params = R.random_root(TINY, num_blocks=2, seed=0, num_classes=3)
    mask = (False, False, False, False, True, True)
    fn = train_step_fn(arch, 4, False)
    from mu2net.evolver.training import traced_hparams, zeros_like_tree

    x, y = _data(32)
    suffix = params[4:]
    jaxpr = fn.trace(suffix, zeros_like_tree(suffix), params[:4], [True, True], x, y, 0, 10.0,
                     traced_hparams(H.DEFAULTS), jax.random.PRNGKey(0)).jaxpr
    # the patch-embedding convolution runs forward only: no transposed (gradient) convolution
    text = str(jaxpr)
    assert text.count("conv_general_dilated") == 1


def test_cosine_schedule_with_warmup():
    total, peak = 100.0, 0.1
    lrs = [float(cosine_with_warmup(np.int32(s), total, peak, 0.1)) for s in range(100)]
    assert abs(lrs[9] - peak) < 1e-6 and lrs[0] < lrs[5] < lrs[9]
    assert lrs[50] < lrs[20] and lrs[99] < 1e-3


def test_on_cycle_reports_every_cycles_validation_accuracy():
    arch, params = R.random_root(TINY, num_blocks=1, seed=4, num_classes=3)
    calls: list[tuple[int, float]] = []
    res = train_child(arch, params, [None] * 5, (False, False, False, True, True), H.with_defaults({}), _data(),
                      _data(32), TrainBudget(3, 32, 32), lambda a, p: a, seed=0,
                      on_cycle=lambda done, acc: calls.append((done, acc)))
    assert calls == list(enumerate(res.history, start=1)) and len(calls) == 3


def test_interrupt_stops_after_the_current_cycle_with_the_best_checkpoint():
    arch, params = R.random_root(TINY, num_blocks=1, seed=4, num_classes=3)
    mask = (True,) * 5
    asked = []

    def interrupt():
        asked.append(len(asked) + 1)
        return len(asked) >= 2  # a new task arrives during the second cycle

    res = train_child(arch, params, [None] * 5, mask, H.with_defaults({"learning_rate": 0.1}), _data(), _data(32),
                      TrainBudget(5, 64, 32), lambda a, p: a, seed=0, interrupt=interrupt)
    assert len(res.history) == 2 and asked == [1, 2]
    assert res.score == max(res.history) and res.steps in (2, 4)
    full = train_child(arch, params, [None] * 5, mask, H.with_defaults({"learning_rate": 0.1}), _data(), _data(32),
                       TrainBudget(5, 64, 32), lambda a, p: a, seed=0, interrupt=lambda: False)
    assert len(full.history) == 5 and full.history[:2] == res.history  # same run until the interrupt


@pytest.mark.parametrize("first", [1, 3])
def test_a_frozen_prefix_is_run_once_for_validation_and_gives_the_same_accuracy(first, monkeypatch):
    from mu2net.evolver import training as T

    arch, params = R.random_root(TINY, num_blocks=1, seed=4, num_classes=3)
    mask = (False,) * first + (True,) * (5 - first)
    validation = _data(300, seed=5)  # more than one validation batch
    child = T.ChildTraining(arch, params, [None] * 5, mask, H.with_defaults({"learning_rate": 0.1}), _data(),
                            validation, TrainBudget(3, 64, 32), lambda a, p: a, seed=0)
    child.run(1)
    assert child._val_activations is not None and len(child._val_activations) == 2
    calls = []
    real = T._prefix_fn
    monkeypatch.setattr(T, "_prefix_fn", lambda *a: calls.append(a) or real(*a))
    child.run(2)
    assert calls == []  # not run again for the later validations
    full = P.accuracy(arch, list(child.prefix) + list(child.suffix), *validation)
    assert child.history[-1] == pytest.approx(full, abs=1 / len(validation[1]))
    monkeypatch.setattr(T, "VALIDATION_CACHE_BYTES", 0)  # too big to keep: the whole path runs each time
    small = T.ChildTraining(arch, params, [None] * 5, mask, H.with_defaults({}), _data(), validation,
                            TrainBudget(1, 64, 32), lambda a, p: a, seed=0)
    small.run(1)
    assert small._val_activations is None and len(small.history) == 1


def test_min_samples_gives_a_small_training_split_several_epochs_per_cycle():
    assert TrainBudget(4, 4096, 64).samples_per_cycle(40) == 40  # the paper's min(1 epoch, cap)
    assert TrainBudget(4, 4096, 64, min_samples=512).samples_per_cycle(40) == 512
    assert TrainBudget(4, 4096, 64, min_samples=512).samples_per_cycle(60000) == 4096
    assert TrainBudget(4, 300, 64, min_samples=512).samples_per_cycle(40) == 300  # the cap still holds
    arch, params = R.random_root(TINY, num_blocks=1, seed=4, num_classes=3)
    res = train_child(arch, params, [None] * 5, (True,) * 5, H.with_defaults({}), _data(40), _data(32),
                      TrainBudget(2, 4096, 32, min_samples=256), lambda a, p: a, seed=0)
    assert len(res.history) == 2 and res.steps in (8, 16)  # 256 / 32 steps per cycle, best checkpoint's count


DATA_PARALLEL_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from conftest import TINY
from mu2net import hparams as H, root as R
from mu2net.evolver import training as T

assert len(jax.devices()) == 2
arch, params = R.random_root(TINY, num_blocks=1, seed=4, num_classes=3)
rng = np.random.default_rng(0)
data = lambda n: (rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int32))
train, validation = data(128), data(300)
out = {}
for name, device in (("one", jax.devices()[0]), ("both", jax.devices())):
    for first in (0, 3):
        mask = (False,) * first + (True,) * (5 - first)
        child = T.ChildTraining(arch, params, [None] * 5, mask, H.with_defaults({"learning_rate": 0.1}), train,
                                validation, T.TrainBudget(3, 128, 32), lambda a, p: a, seed=0, device=device)
        child.run(2)
        child.park(); child.place(device)  # parked and placed again: the same schedule goes on there
        shardings = {str(leaf.sharding.device_set) for leaf in jax.tree_util.tree_leaves(child.suffix)}
        batch = child._put_batch(train[0][:32])
        split = [len(s.data) for s in batch.addressable_shards]
        child.run(1)
        res = child.result()
        out[f"{name}{first}"] = {"history": list(res.history), "devices": sorted(shardings), "split": split,
                                 "params": [float(np.sum(np.abs(leaf))) for p in res.params.values()
                                            for leaf in jax.tree_util.tree_leaves(p)]}
print(json.dumps(out))
"""


def test_a_child_trained_data_parallel_on_two_devices_matches_one_device():
    """Two CPU devices (a subprocess: the device count is fixed when JAX starts): the same
    child trained with its batches split between both devices (``placement``) takes the same
    steps as on one device, up to float summation order, also when parked and placed again."""
    import json
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL_SCRIPT, tests], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for first in (0, 3):
        one, both = out[f"one{first}"], out[f"both{first}"]
        assert len(one["devices"]) == 1 and one["devices"][0].count("CpuDevice") == 1
        assert both["devices"][0].count("CpuDevice") == 2  # parameters replicated on both devices
        assert one["split"] == [32] and both["split"] == [16, 16]  # a batch split between them
        assert len(both["history"]) == 3
        np.testing.assert_allclose(both["history"], one["history"], atol=2 / 300)
        np.testing.assert_allclose(both["params"], one["params"], rtol=1e-3, atol=1e-6)


def test_placement_falls_back_to_one_device_when_the_batch_does_not_split():
    from mu2net.evolver import training as T

    put, put_batch = T.placement(None, 64)
    assert put is put_batch and put(np.zeros(2)).devices() == {jax.devices()[0]}
    put, put_batch = T.placement([jax.devices()[0]] * 3, 64)  # 64 is not divisible by 3: the first device
    assert put is put_batch and put_batch(np.zeros(64)).devices() == {jax.devices()[0]}

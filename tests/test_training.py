"""Train step: frozen components untouched, compile cache by architecture signature."""

import jax
import numpy as np

from conftest import TINY
from mu2net import hparams as H
from mu2net import paths as P
from mu2net import root as R
from mu2net.evolver.training import TrainBudget, cosine_with_warmup, train_child, train_step_fn


def _data(n=64, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8), rng.integers(0, classes, n).astype(np.int32)


def test_frozen_components_are_not_modified_and_trainable_ones_are():
    arch, params = R.random_root(TINY, num_blocks=2, seed=0, num_classes=3)
    before = jax.device_get(params)
    mask = (False, False, False, False, True, True)
    res = train_child(arch, params, [None] * 6, mask, H.with_defaults({"learning_rate": 0.1}), _data(), _data(32),
                      TrainBudget(1, 64, 32), lambda a, p: a, seed=0)
    assert set(res.params) == {4, 5}
    for i in range(4):
        for a, b in zip(jax.tree_util.tree_leaves(before[i]), jax.tree_util.tree_leaves(params[i])):
            np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before[4]),
                                                           jax.tree_util.tree_leaves(res.params[4]))]
    assert any(changed)
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
    assert train_step_fn(arch, mask, False) is train_step_fn(arch, mask, False)


def test_no_gradient_is_computed_below_the_lowest_trainable_component():
    arch, params = R.random_root(TINY, num_blocks=2, seed=0, num_classes=3)
    mask = (False, False, False, False, True, True)
    fn = train_step_fn(arch, mask, False)
    from mu2net.evolver.training import _split, traced_hparams, zeros_like_tree

    trainable, frozen = _split(params, mask)
    x, y = _data(32)
    jaxpr = fn.trace(trainable, zeros_like_tree(trainable), frozen, x, y, 0, 10.0,
                     traced_hparams(H.DEFAULTS), jax.random.PRNGKey(0)).jaxpr
    # the patch-embedding convolution runs forward only: no transposed (gradient) convolution
    text = str(jaxpr)
    assert text.count("conv_general_dilated") == 1


def test_cosine_schedule_with_warmup():
    total, peak = 100.0, 0.1
    lrs = [float(cosine_with_warmup(np.int32(s), total, peak, 0.1)) for s in range(100)]
    assert abs(lrs[9] - peak) < 1e-6 and lrs[0] < lrs[5] < lrs[9]
    assert lrs[50] < lrs[20] and lrs[99] < 1e-3

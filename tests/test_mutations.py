"""One parameterized test per mutation operator (paper Section 3.2 and Section 4)."""

import numpy as np
import pytest

from mu2net import components as C
from mu2net import hparams as H
from mu2net.evolver.mutations import mutate, mutate_hparams
from mu2net.paths import Architecture, Path

CFG = C.ViTConfig(8, 4, 16, 32, 2)
KINDS1 = ("patch_embedding", "class_token", "position_embedding", "transformer_block", "head")


def _parent(task="t", mu=0.3, blocks=1):
    kinds = KINDS1[:3] + ("transformer_block",) * blocks + ("head",)
    return Path(id="p", task=task, component_ids=tuple(f"c{i}" for i in range(len(kinds))),
                architecture=Architecture(CFG, kinds, 3), hparams=H.with_defaults({"mu": mu}), score=0.5)


def _many(parent, task="t", n=2000, **kw):
    rng = np.random.default_rng(0)
    return [mutate(parent, task, 3 if task == "t" else 7, rng, **kw) for _ in range(n)]


@pytest.mark.parametrize("operator", ["hparam", "clone", "own_components", "random_root", "same_task_head", "new_head", "insert", "remove", "forced_insert"])
def test_mutation_operator(operator):
    mu = 0.3
    if operator == "hparam":
        children = _many(_parent(mu=mu))
        for name in H.SEARCH_SPACE:
            changed = [c.hparams[name] for c in children if c.hparams[name] != H.DEFAULTS[name] or name == "mu" and c.hparams[name] != mu]
            if name == "mu":
                changed = [c.hparams[name] for c in children if c.hparams[name] != mu]
                allowed = H.neighbours("mu", mu)
            else:
                allowed = H.neighbours(name, H.DEFAULTS[name])
            assert set(changed) <= set(allowed), name
            assert abs(len(changed) / len(children) - mu) < 0.05, name  # sampled with probability mu
    elif operator == "clone":
        children = _many(_parent(mu=mu), allow_insertion=False)
        rate = np.mean([c.trainable[:-1] for c in children], axis=0)
        assert np.all(np.abs(rate - mu) < 0.05), rate
        for c in children:  # cloned components start from the parent's; frozen ones are shared
            assert c.sources == _parent().component_ids
    elif operator == "own_components":
        # c0, c3 belong to retained models (root, other tasks): cloned with probability mu;
        # c1, c2 only to the active task's own models: always cloned, i.e. they keep training
        children = _many(_parent(mu=mu), allow_insertion=False, locked=frozenset({"c0", "c3"}))
        rate = np.mean([c.trainable[:-1] for c in children], axis=0)
        assert np.all(np.abs(rate[[0, 3]] - mu) < 0.05) and np.all(rate[[1, 2]] == 1.0), rate
        for c in children:
            assert c.sources == _parent().component_ids and c.trainable[-1]
    elif operator == "random_root":
        # c0..c2 are a random root's (clone_random_root): always cloned; c3 another task's:
        # cloned with probability mu
        locked = frozenset({"c0", "c1", "c2", "c3"})
        children = _many(_parent(mu=mu), allow_insertion=False, locked=locked, always_clone=frozenset({"c0", "c1", "c2"}))
        rate = np.mean([c.trainable[:-1] for c in children], axis=0)
        assert np.all(rate[:3] == 1.0) and abs(rate[3] - mu) < 0.05, rate
        assert all("clone_random:0:patch_embedding" in c.mutations for c in children)
    elif operator == "same_task_head":
        for c in _many(_parent(), n=50, allow_insertion=False):
            assert c.trainable[-1] and c.sources[-1] == "c4" and c.architecture.num_classes == 3
    elif operator == "new_head":
        for c in _many(_parent(task="other"), task="t2", n=50, allow_insertion=False):
            assert c.trainable[-1] and c.sources[-1] is None and c.architecture.num_classes == 7
    elif operator == "insert":
        children = _many(_parent(mu=mu))
        inserted = [c for c in children if c.architecture.num_blocks == 2]
        assert abs(len(inserted) / len(children) - mu) < 0.05
        for c in inserted:  # new block right before the head, trainable, randomly initialised
            assert c.architecture.kinds[-2] == "transformer_block" and c.sources[-2] is None and c.trainable[-2]
        assert all(c.architecture.num_blocks == 1 for c in _many(_parent(), n=50, max_blocks=1))
    elif operator == "remove":
        children = _many(_parent(mu=mu, blocks=2))
        removed = [c for c in children if c.architecture.num_blocks == 1]
        inserted = [c for c in children if c.architecture.num_blocks == 3]
        # +-1 with equal chance: each with probability mu / 2
        assert abs(len(removed) / len(children) - mu / 2) < 0.04 and abs(len(inserted) / len(children) - mu / 2) < 0.04
        for c in removed:  # the top block (c4) is gone; the rest and the head are the parent's
            assert c.sources == ("c0", "c1", "c2", "c3", "c5") and c.architecture.kinds[-1] == "head"
            assert "remove_block:4" in c.mutations
        at_cap = _many(_parent(mu=mu, blocks=2), n=400, max_blocks=2)
        assert {c.architecture.num_blocks for c in at_cap} == {1, 2}  # only removal at the cap
    elif operator == "forced_insert":
        for c in _many(_parent(blocks=0), n=50):
            assert c.architecture.num_blocks == 1


def test_mutate_hparams_uses_parent_mu():
    rng = np.random.default_rng(0)
    hp = H.with_defaults({"mu": 0.1})
    n_changed = sum(len(mutate_hparams(hp, rng)[1]) for _ in range(3000))
    assert abs(n_changed / (3000 * len(H.SEARCH_SPACE)) - 0.1) < 0.01


def test_per_mutation_probabilities_are_inherited_used_and_themselves_mutated():
    lr_key, clone_key = H.mutation_prob_key("hp:learning_rate"), H.mutation_prob_key("clone:3")
    parent = _parent(mu=0.1)
    parent = Path(id="p", task="t", component_ids=parent.component_ids, architecture=parent.architecture,
                  hparams={**parent.hparams, lr_key: 0.30, clone_key: 0.02}, score=0.5)
    H.validate(parent.hparams)  # the keys are valid hparams
    children = _many(parent, n=3000, allow_insertion=False, locked=frozenset({"c0", "c3"}), per_mutation=True)
    lr_rate = np.mean([c.hparams["learning_rate"] != H.DEFAULTS["learning_rate"] for c in children])
    crop_rate = np.mean([c.hparams["crop_area_min"] != H.DEFAULTS["crop_area_min"] for c in children])
    clone3 = np.mean([c.trainable[3] for c in children])
    assert abs(lr_rate - 0.3) < 0.04 and abs(crop_rate - 0.1) < 0.03 and clone3 < 0.05, (lr_rate, crop_rate, clone3)
    moved = [c.hparams[lr_key] for c in children if c.hparams[lr_key] != 0.30]
    # moves with probability mu (about 0.1) by one step; at the top end half the moves clip to 0.30
    assert set(moved) == {0.28} and 0.02 < len(moved) / len(children) < 0.09
    # every mutation a child drew records its own probability (missing keys start at mu)
    assert all(H.mutation_prob_key("hp:flip") in c.hparams and H.mutation_prob_key("clone:0") in c.hparams
               for c in children[:20])
    # mu moves first (0.10 -> 0.12 at most), a missing key starts at the child's mu, then one step
    assert {c.hparams[H.mutation_prob_key("hp:flip")] for c in children} == {0.08, 0.10, 0.12, 0.14}
    for c in children[:50]:
        H.validate(c.hparams)
    with pytest.raises(ValueError, match="mutation probability"):
        H.validate({**parent.hparams, lr_key: 0.5})


def test_without_per_mutation_probabilities_children_hold_only_table_1_keys():
    for c in _many(_parent(mu=0.3), n=100):
        assert set(c.hparams) == set(H.SEARCH_SPACE)

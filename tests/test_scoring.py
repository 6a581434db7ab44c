"""Scorers (paper Section 3.3; the official code's size penalty, ScorerDecay)."""

import pytest

from mu2net.evolver.scoring import (REFERENCE_BLOCKS, accounted_params, accuracy_scorer, make_scorer,
                                    reference_params, size_penalty_scorer)


def test_accuracy_scorer_is_the_validation_accuracy():
    assert accuracy_scorer()(0.75, 10 ** 9) == 0.75


def test_accounted_params_divide_shared_components_by_their_tasks():
    # a frozen embedding shared with 3 other tasks, a block shared with 1, a trained head
    assert accounted_params([400, 1000, 50], [3, 1, 0]) == 400 / 4 + 1000 / 2 + 50


def test_size_penalty_against_a_fixed_reference():
    ref = reference_params(root_params=10_817, block_params=33_472, root_blocks=0)
    assert ref == 10_817 + REFERENCE_BLOCKS * 33_472
    assert reference_params(150_000, 33_472, root_blocks=4) == 150_000  # a root with blocks is its own reference
    score = size_penalty_scorer(ref, base=0.99)
    # one more unshared block costs about a third of a point, not ~3 points (the old root reference)
    one, two = score(0.95, 10_817 + 33_472), score(0.95, 10_817 + 2 * 33_472)
    assert 0.0025 < one - two < 0.0035
    assert make_scorer("size_penalty", ref, 1.0)(0.9, 10 ** 9) == 0.9  # base 1 disables the penalty
    with pytest.raises(ValueError, match="reference_params"):
        size_penalty_scorer(0)
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("latency", ref)

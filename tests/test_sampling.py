import numpy as np
from scipy import stats

from mu2net import components as C
from mu2net.evolver.sampling import sample_parent
from mu2net.paths import Architecture, Path

ARCH = Architecture(C.ViTConfig(8, 4, 16, 32, 2), ("patch_embedding", "class_token", "position_embedding", "head"), 2)


def _path(pid, task, score):
    return Path(id=pid, task=task, component_ids=(), architecture=ARCH, hparams={}, score=score)


def test_parent_sampling_probabilities_match_section_3_1():
    best, second = _path("best", "t", 0.9), _path("second", "t", 0.8)
    other = _path("other", "u", 0.99)
    selections = {"best": 1, "second": 2, "other": 3}
    # P(best) = 0.5; P(second) = 0.5 * 0.25; P(other) = 0.375 * 0.125;
    # remaining mass is the uniform fallback over the three paths.
    p_best, p_second = 0.5, 0.5 * 0.25
    p_other_rule = (1 - p_best - p_second) * 0.125
    p_uniform = 1 - p_best - p_second - p_other_rule
    expected = np.array([p_best + p_uniform / 3, p_second + p_uniform / 3, p_other_rule + p_uniform / 3])
    rng = np.random.default_rng(1234)
    n = 20000
    counts = {"best": 0, "second": 0, "other": 0}
    rules = {"active": 0, "other": 0, "uniform": 0}
    for _ in range(n):
        m, rule = sample_parent([second, best], [other], selections, rng)
        counts[m.id] += 1
        rules[rule] += 1
    observed = np.array([counts["best"], counts["second"], counts["other"]])
    assert stats.chisquare(observed, expected * n).pvalue > 0.001
    assert abs(rules["uniform"] / n - p_uniform) < 0.01


def test_unselected_best_is_always_accepted_first():
    best, second = _path("best", "t", 0.9), _path("second", "t", 0.8)
    rng = np.random.default_rng(0)
    assert all(sample_parent([second, best], [], {}, rng)[0].id == "best" for _ in range(100))


def test_empty_system_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="no path"):
        sample_parent([], [], {}, np.random.default_rng(0))

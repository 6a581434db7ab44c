import pytest

from mu2net import hparams as H


def test_search_space_is_sorted_and_defaults_valid():
    for name, values in H.SEARCH_SPACE.items():
        assert list(values) == sorted(values), name
    assert H.validate(H.DEFAULTS) == H.DEFAULTS


@pytest.mark.parametrize("name,value,expected", [
    ("mu", 0.10, (0.12,)), ("mu", 0.30, (0.28,)), ("learning_rate", 0.01, (0.005, 0.02)),
    ("nesterov", False, (True,)), ("crop_aspect_min", 0.5, (0.25, 0.75)),
])
def test_neighbours(name, value, expected):
    assert H.neighbours(name, value) == expected


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="learning_rate=0.3"):
        H.with_defaults({"learning_rate": 0.3})
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        H.with_defaults({"weight_decay": 0.1})

import pytest

from mu2net import hparams as H


#: Table 1 of the paper as printed (../shared/mu2net-paper.txt, "Hyperparameters valid values"),
#: row by row; the defaults are the official code's (the bold values the text loses).
TABLE_1 = {
    "mu": [0.10, 0.12, 0.14, 0.16, 0.18, 0.20, 0.22, 0.24, 0.26, 0.28, 0.30],
    "learning_rate": [0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5],
    "warmup_ratio": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4],
    "momentum": [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99],
    "nesterov": [False, True],
    "crop": [False, True],
    "crop_area_min": [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
    "crop_aspect_min": [0.25, 0.5, 0.75, 1.0],
    "flip": [False, True],
    "brightness": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "contrast": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "saturation": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "hue": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
}
OFFICIAL_DEFAULTS = {"mu": 0.1, "learning_rate": 0.01, "warmup_ratio": 0.1, "momentum": 0.9, "nesterov": False,
                     "crop": True, "crop_area_min": 0.05, "crop_aspect_min": 0.75, "flip": True,
                     "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def test_search_space_and_defaults_are_table_1_exactly():
    assert list(H.SEARCH_SPACE) == list(TABLE_1)  # the paper's order, no more and no fewer rows
    for name, values in TABLE_1.items():
        assert list(H.SEARCH_SPACE[name]) == values, name
        assert [type(v) for v in H.SEARCH_SPACE[name]] == [type(v) for v in values], name  # bools stay bools
    assert H.DEFAULTS == OFFICIAL_DEFAULTS


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

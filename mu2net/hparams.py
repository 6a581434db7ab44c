"""The hyperparameter search space of the paper's Table 1.

Every hyperparameter has a sorted list of valid values; a hyperparameter mutation moves to
one of the (at most two) neighbouring values (paper Section 3.2, Figure 1).

Defaults are those of the official mu2Net code (the bold values of Table 1, which the text
version of the paper loses): mu 0.1, learning rate 0.01, warm-up ratio 0.1, momentum 0.9,
no Nesterov, crop on with area min 0.05 and aspect-ratio min 0.75, flip on, no colour jitter.
A :class:`mu2net.evolver.EvolverConfig` may override the defaults for the root path (flip
and crop make little sense for digits, for example).
"""

from __future__ import annotations

from typing import Any, Mapping

#: Table 1, in the paper's order. Each list is sorted ascending.
SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "mu": (0.10, 0.12, 0.14, 0.16, 0.18, 0.20, 0.22, 0.24, 0.26, 0.28, 0.30),
    "learning_rate": (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
    "warmup_ratio": (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4),
    "momentum": (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99),
    "nesterov": (False, True),
    "crop": (False, True),
    "crop_area_min": (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
    "crop_aspect_min": (0.25, 0.5, 0.75, 1.0),
    "flip": (False, True),
    "brightness": (0.0, 0.01, 0.02, 0.05, 0.1, 0.2),
    "contrast": (0.0, 0.01, 0.02, 0.05, 0.1, 0.2),
    "saturation": (0.0, 0.01, 0.02, 0.05, 0.1, 0.2),
    "hue": (0.0, 0.01, 0.02, 0.05, 0.1, 0.2),
}

#: Defaults of the official mu2Net code (Table 1's bold values).
DEFAULTS: dict[str, Any] = {
    "mu": 0.10,
    "learning_rate": 0.01,
    "warmup_ratio": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "crop": True,
    "crop_area_min": 0.05,
    "crop_aspect_min": 0.75,
    "flip": True,
    "brightness": 0.0,
    "contrast": 0.0,
    "saturation": 0.0,
    "hue": 0.0,
}


#: Prefix of a per-mutation mutation probability's key (mu3Net, "mu2Net+": one probability per
#: mutation, each itself mutated; the official notebook's ``"_mu_|" + mutation name``). A
#: path without such a key uses ``mu`` for that mutation.
MUTATION_PROB_PREFIX = "mu|"
#: Values a per-mutation probability takes (the official mu3Net notebook's ``_mu_`` range).
MUTATION_PROB_VALUES: tuple[float, ...] = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.14, 0.16, 0.18, 0.20, 0.22,
                                           0.24, 0.26, 0.28, 0.30)


def mutation_prob_key(mutation: str) -> str:
    """Key of a mutation's own probability, e.g. ``mu|hp:learning_rate``, ``mu|clone:3``,
    ``mu|layers``."""
    return MUTATION_PROB_PREFIX + mutation


def validate(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Checks that ``hparams`` holds exactly the Table 1 keys with valid values, plus any
    per-mutation probabilities (:data:`MUTATION_PROB_PREFIX` keys, values in
    :data:`MUTATION_PROB_VALUES`).

    Returns:
      A plain dict copy of ``hparams``.

    Raises:
      ValueError: naming the unknown/missing key or the invalid value and the allowed ones.
    """
    probs = {k: v for k, v in hparams.items() if k.startswith(MUTATION_PROB_PREFIX)}
    for name, value in probs.items():
        if value not in MUTATION_PROB_VALUES:
            raise ValueError(f"mutation probability {name}={value!r} is not allowed; allowed: "
                             f"{list(MUTATION_PROB_VALUES)}")
    unknown = sorted(set(hparams) - set(SEARCH_SPACE) - set(probs))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown}; allowed: {sorted(SEARCH_SPACE)}")
    missing = sorted(set(SEARCH_SPACE) - set(hparams))
    if missing:
        raise ValueError(f"missing hyperparameter(s) {missing}")
    for name, value in hparams.items():
        if name not in probs and value not in SEARCH_SPACE[name]:
            raise ValueError(
                f"hyperparameter {name}={value!r} is not a Table 1 value; allowed: {list(SEARCH_SPACE[name])}"
            )
    return dict(hparams)


def with_defaults(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Returns :data:`DEFAULTS` updated with ``overrides`` (validated)."""
    return validate({**DEFAULTS, **(overrides or {})})


def neighbours(name: str, value: Any) -> tuple[Any, ...]:
    """The neighbouring values of ``value`` in the sorted list of ``name`` (Section 3.2).

    Raises:
      ValueError: if ``name`` or ``value`` is not in Table 1.
    """
    if name not in SEARCH_SPACE:
        raise ValueError(f"unknown hyperparameter {name!r}; allowed: {sorted(SEARCH_SPACE)}")
    values = SEARCH_SPACE[name]
    if value not in values:
        raise ValueError(f"{name}={value!r} is not a Table 1 value; allowed: {list(values)}")
    i = values.index(value)
    return tuple(values[j] for j in (i - 1, i + 1) if 0 <= j < len(values))

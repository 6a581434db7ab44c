"""Scorers: what the evolver maximises (paper Section 3.3).

A scorer maps ``(validation accuracy in [0, 1], activated parameters of the path)`` to a
score. The paper uses the validation accuracy directly; the official mu2Net code also
offers a size penalty ``accuracy * base ** (params / root_params)``.
"""

from __future__ import annotations

from typing import Callable

Scorer = Callable[[float, int], float]


def accuracy_scorer() -> Scorer:
    """Score = validation accuracy (the paper's choice, Section 3.3)."""
    return lambda accuracy, params: float(accuracy)


def size_penalty_scorer(root_params: int, base: float = 0.99) -> Scorer:
    """Score = accuracy * base ** (params / root_params), as in the official mu2Net code.

    Args:
      root_params: parameters of the root model (> 0).
      base: penalty base in (0, 1]; 1 disables the penalty.

    Raises:
      ValueError: for ``root_params <= 0`` or ``base`` outside (0, 1].
    """
    if root_params <= 0:
        raise ValueError(f"root_params must be > 0, got {root_params}")
    if not 0.0 < base <= 1.0:
        raise ValueError(f"size penalty base must be in (0, 1], got {base}")
    return lambda accuracy, params: float(accuracy) * base ** (params / root_params)


SCORERS = ("accuracy", "size_penalty")


def make_scorer(name: str, root_params: int, base: float = 0.99) -> Scorer:
    """Builds a scorer by name (one of :data:`SCORERS`)."""
    if name == "accuracy":
        return accuracy_scorer()
    if name == "size_penalty":
        return size_penalty_scorer(root_params, base)
    raise ValueError(f"unknown scorer {name!r}; allowed: {list(SCORERS)}")

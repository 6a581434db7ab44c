"""Scorers: what the evolver maximises (paper Section 3.3).

A scorer maps ``(validation accuracy in [0, 1], accounted parameters of the path)`` to a
score. The paper uses the validation accuracy directly; the official mu2Net code also
offers a size penalty ``accuracy * base ** (accounted params / reference params)``
(``ScorerDecay`` in the official mu2Net notebook), where a path's *accounted* parameters
divide each component's parameters by the number of tasks whose retained paths share it
(this path's task included; see :func:`accounted_params`), and the reference is a fixed
model size (the notebook uses the full root ViT, e.g. 1,484,162 for Ti/16 with 3 blocks).
"""

from __future__ import annotations

from typing import Callable, Sequence

Scorer = Callable[[float, float], float]


def accuracy_scorer() -> Scorer:
    """Score = validation accuracy (the paper's choice, Section 3.3)."""
    return lambda accuracy, params: float(accuracy)


def size_penalty_scorer(reference_params: int, base: float = 0.99) -> Scorer:
    """Score = accuracy * base ** (accounted params / reference_params), as the official
    mu2Net code's ``ScorerDecay``.

    Args:
      reference_params: the fixed reference size (> 0), see :func:`reference_params`.
      base: penalty base in (0, 1]; 1 disables the penalty.

    Raises:
      ValueError: for ``reference_params <= 0`` or ``base`` outside (0, 1].
    """
    if reference_params <= 0:
        raise ValueError(f"reference_params must be > 0, got {reference_params}")
    if not 0.0 < base <= 1.0:
        raise ValueError(f"size penalty base must be in (0, 1], got {base}")
    return lambda accuracy, params: float(accuracy) * base ** (params / reference_params)


#: Transformer blocks of the reference model when the root has none (the official
#: notebook's reference for its 0-block Ti/16 root is the 3-block Ti/16).
REFERENCE_BLOCKS = 3


def reference_params(root_params: int, block_params: int, root_blocks: int) -> int:
    """The size penalty's fixed reference: the root model's parameters, counting
    :data:`REFERENCE_BLOCKS` transformer blocks when the root has none (a 0-block root's
    ~11k parameters would make every block cost as much as a large accuracy loss)."""
    return root_params + (REFERENCE_BLOCKS * block_params if root_blocks == 0 else 0)


def accounted_params(num_params: Sequence[int], sharers: Sequence[int]) -> float:
    """A path's parameters with each component's divided by the tasks sharing it.

    Args:
      num_params: parameters of each component of the path.
      sharers: per component, how many *other* tasks' retained paths use it (0 for a
        component the child trains: cloned or new).

    Returns:
      ``sum(n / (1 + s))``, the official code's ``accounted_num_params``.
    """
    return float(sum(n / (1 + s) for n, s in zip(num_params, sharers)))


SCORERS = ("accuracy", "size_penalty")


def make_scorer(name: str, reference: int, base: float = 0.99) -> Scorer:
    """Builds a scorer by name (one of :data:`SCORERS`); ``reference`` is the size
    penalty's reference parameter count."""
    if name == "accuracy":
        return accuracy_scorer()
    if name == "size_penalty":
        return size_penalty_scorer(reference, base)
    raise ValueError(f"unknown scorer {name!r}; allowed: {list(SCORERS)}")

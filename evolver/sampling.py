"""Parent sampling (paper Section 3.1)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from mu2net.paths import Path


def sample_parent(active_population: Sequence[Path], other_paths: Sequence[Path],
                  selections: Mapping[str, int], rng: np.random.Generator) -> tuple[Path, str]:
    """Samples the parent of the next child for the active task.

    1. Visit the active population by decreasing score, accepting each path m with
       probability 0.5 ** #selections(m, t).
    2. Failing that, visit the other allowed paths (trained on other tasks, and the root
       model) in random order with the same acceptance probability.
    3. Failing that, sample uniformly among all allowed paths.

    Args:
      active_population: paths trained on the active task (with scores).
      other_paths: paths the active task may use that were not trained on it (the caller
        has removed those a privacy policy forbids).
      selections: #selections(m, t) by path id for the active task.
      rng: numpy random generator.

    Returns:
      (parent, which rule selected it: "active", "other" or "uniform").

    Raises:
      ValueError: if both sequences are empty.
    """
    everything = list(active_population) + list(other_paths)
    if not everything:
        raise ValueError("no path to sample a parent from (the system has no root model)")
    for m in sorted(active_population, key=lambda p: -(p.score if p.score is not None else -np.inf)):
        if rng.random() < 0.5 ** selections.get(m.id, 0):
            return m, "active"
    for i in rng.permutation(len(other_paths)):
        m = other_paths[int(i)]
        if rng.random() < 0.5 ** selections.get(m.id, 0):
            return m, "other"
    return everything[int(rng.integers(len(everything)))], "uniform"

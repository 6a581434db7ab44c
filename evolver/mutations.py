"""Mutations (paper Section 3.2, and the layer insertion of Section 4).

Every hyperparameter mutation and every layer-cloning choice is sampled independently
with probability mu, the parent's own (mutable) mu. A hyperparameter mutation moves to a
neighbouring value of Table 1's sorted list. A component not cloned is shared frozen; a
cloned one is trainable and starts from the parent's parameters and optimizer state. The
head is always trainable, and is new when the parent belongs to another task. The
layer-insertion mutation adds a new transformer block just before the head; its
counterpart removes the block just before the head (the official preliminary
configuration mutates the number of blocks by +-1, within 1..max_blocks).

Which components the layer-cloning mutation applies to: the *locked* ones, i.e. those of
the models the multitask system retains for other purposes than the active task (the root
model and every other task's best path). Section 3.2 freezes a shared layer "to guarantee
immutability of pre-existing models"; a component that only the active task's own models
use (made by its earlier children, or only in its own best path) is cloned by every child
and keeps training, as the official mu2Net code does with its per-task *train locks*
(locks are added to a task's retained path at the end of its active phase and lifted at
the start of its next one). Cloning copies, so the parent itself is never changed either
way.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, AbstractSet, Any, Mapping

import numpy as np

from mu2net import components as C
from mu2net import hparams as H
from mu2net.paths import Architecture, Path

if TYPE_CHECKING:
    from mu2net.evolver.training import TrainBudget

#: Position source of a newly initialised component in :attr:`ChildSpec.sources`.
NEW = None


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    """A child before training: which parent components it shares, clones or replaces.

    Attributes:
      parent: the parent path.
      task: the active task.
      architecture: the child's architecture.
      sources: per position, the parent component id it starts from, or None for a new
        randomly initialised component (new head, inserted block).
      trainable: per position, whether the child trains it (cloned or new).
      hparams: mutated Table 1 hyperparameters.
      mutations: human-readable list of the applied mutations (for logs and provenance).
      cycles: train cycles of this child when they are not its generation's budget (a
        random root's first-answer child on one long schedule,
        :attr:`mu2net.evolver.EvolverConfig.first_answer_epochs`); None: the budget's.
      cycle_samples: training examples per cycle of this child when they are not the
        budget's (a long child validates less often:
        :attr:`mu2net.evolver.EvolverConfig.long_validation_ratio`); None: the budget's.
    """

    parent: Path
    task: str
    architecture: Architecture
    sources: tuple[str | None, ...]
    trainable: tuple[bool, ...]
    hparams: Mapping[str, Any]
    mutations: tuple[str, ...]
    cycles: int | None = None
    cycle_samples: int | None = None

    def budget(self, budget: TrainBudget) -> TrainBudget:
        """``budget`` with this child's own cycles and examples per cycle, where it has them."""
        if self.cycles is not None:
            budget = dataclasses.replace(budget, cycles=self.cycles)
        if self.cycle_samples is not None:
            budget = dataclasses.replace(budget, sample_cap=self.cycle_samples, min_samples=self.cycle_samples)
        return budget


def mutation_probability(hparams: dict[str, Any], mutation: str, rng: np.random.Generator,
                         per_mutation: bool) -> float:
    """The probability of ``mutation`` for a child whose (already copied) hparams are ``hparams``.

    Without ``per_mutation`` it is ``hparams["mu"]``. With it (mu3Net, "mu2Net+"), each
    mutation has its own probability under :func:`mu2net.hparams.mutation_prob_key`
    (``mu`` when the parent has none), inherited from the parent: with probability ``mu``
    it first moves to a neighbouring value of :data:`mu2net.hparams.MUTATION_PROB_VALUES`
    (one step up or down, clipped at the ends); the child stores it and uses the new value,
    as the official mu3Net notebook does.
    """
    mu = float(hparams["mu"])
    if not per_mutation:
        return mu
    key = H.mutation_prob_key(mutation)
    values = H.MUTATION_PROB_VALUES
    prob = hparams.get(key, min(values, key=lambda v: abs(v - mu)))
    if rng.random() < mu:
        i = values.index(prob) + (1 if rng.random() < 0.5 else -1)
        prob = values[max(0, min(len(values) - 1, i))]
    hparams[key] = prob
    return float(prob)


def mutate_hparams(parent_hparams: Mapping[str, Any], rng: np.random.Generator,
                   per_mutation: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Each Table 1 hyperparameter moves to a random neighbour with probability mu.

    mu is the parent's; it is itself one of the mutated hyperparameters, and the first one
    (so with ``per_mutation`` the later probabilities move with the child's new mu). With
    ``per_mutation`` each hyperparameter has its own probability
    (:func:`mutation_probability`).
    """
    child = dict(parent_hparams)
    applied = []
    for name in H.SEARCH_SPACE:  # "mu" first
        prob = mutation_probability(child, f"hp:{name}", rng, per_mutation) if per_mutation else \
            float(parent_hparams["mu"])
        if rng.random() < prob:
            options = H.neighbours(name, parent_hparams[name])
            child[name] = options[int(rng.integers(len(options)))]
            applied.append(f"{name}:{parent_hparams[name]}->{child[name]}")
    return child, applied


def mutate(parent: Path, task: str, num_classes: int, rng: np.random.Generator, *,
           locked: AbstractSet[str] | None = None, allow_insertion: bool = True,
           max_blocks: int = 12, always_clone: AbstractSet[str] = frozenset(),
           per_mutation: bool = False) -> ChildSpec:
    """Samples a child of ``parent`` for the active ``task``.

    Each locked component below the head is cloned (trainable) with probability mu and
    otherwise shared frozen; an unlocked one is always cloned (see the module docstring).
    A layer-count mutation is sampled with probability mu: the number of transformer
    blocks moves to a random neighbouring value within ``1..max_blocks`` (insert a new
    block before the head, or remove the block before the head). A parent without blocks
    always gets one inserted: a ViT without blocks reads only the class token, which does
    not depend on the image.

    Args:
      parent: the parent path.
      task: the active task name.
      num_classes: the active task's classes (size of a new head).
      rng: numpy random generator.
      locked: ids of the locked components (the root model's and other tasks' best
        paths'); None locks every component, so every clone is a mutation.
      allow_insertion: enables the layer-count (insertion/removal) mutation.
      max_blocks: most transformer blocks a child may have.
      always_clone: ids of locked components that are cloned without a mutation draw
        (:attr:`mu2net.evolver.EvolverConfig.clone_random_root`: the components of a
        randomly initialised root hold no knowledge worth sharing frozen).
      per_mutation: each hyperparameter, each position's cloning and the layer count have
        their own mutation probability, itself mutated (mu3Net; see
        :func:`mutation_probability`); off: every mutation uses mu (Section 3.2).

    Returns:
      The :class:`ChildSpec`.
    """
    hp, applied = mutate_hparams(parent.hparams, rng, per_mutation)
    mu = float(parent.hparams["mu"])

    def chance(mutation: str) -> float:
        return mutation_probability(hp, mutation, rng, True) if per_mutation else mu

    kinds = list(parent.architecture.kinds)
    sources: list[str | None] = list(parent.component_ids)
    trainable = [False] * len(kinds)
    for i in range(len(kinds) - 1):
        if locked is not None and sources[i] not in locked:
            trainable[i] = True  # the active task's own component keeps training
        elif sources[i] in always_clone:
            trainable[i] = True
            applied.append(f"clone_random:{i}:{kinds[i]}")
        elif rng.random() < chance(f"clone:{i}"):
            trainable[i] = True
            applied.append(f"clone:{i}:{kinds[i]}")
    trainable[-1] = True
    same_task = parent.task == task
    if not same_task:
        sources[-1] = NEW
        applied.append("new_head")
    n_blocks = parent.architecture.num_blocks
    if allow_insertion and (n_blocks == 0 or rng.random() < chance("layers")):
        # the number of blocks moves to a neighbouring value in 1..max_blocks, as the official
        # preliminary configuration mutates its layer count by +-1
        options = [n for n in (n_blocks - 1, n_blocks + 1) if 1 <= n <= max_blocks]
        target = options[int(rng.integers(len(options)))] if len(options) > 1 else (options or [n_blocks])[0]
        pos = len(kinds) - 1
        if target > n_blocks:
            kinds.insert(pos, C.TRANSFORMER_BLOCK)
            sources.insert(pos, NEW)
            trainable.insert(pos, True)
            applied.append(f"insert_block:{pos}")
        elif target < n_blocks and kinds[pos - 1] == C.TRANSFORMER_BLOCK:
            del kinds[pos - 1], sources[pos - 1], trainable[pos - 1]
            applied.append(f"remove_block:{pos - 1}")
    arch = Architecture(parent.architecture.config, tuple(kinds),
                        parent.architecture.num_classes if same_task else num_classes)
    return ChildSpec(parent=parent, task=task, architecture=arch, sources=tuple(sources),
                     trainable=tuple(trainable), hparams=hp, mutations=tuple(applied))

"""mu2net.evolver: the mu2Net evolutionary method (paper Section 3, Algorithm 1)."""

from mu2net.evolver.loop import PAPER_PRESET, Evolver, EvolverConfig, locked_components
from mu2net.evolver.mutations import ChildSpec, mutate, mutate_hparams
from mu2net.evolver.sampling import sample_parent
from mu2net.evolver.scoring import accuracy_scorer, make_scorer, size_penalty_scorer
from mu2net.evolver.training import TrainBudget, TrainResult, train_child, train_step_fn

__all__ = [
    "PAPER_PRESET", "Evolver", "EvolverConfig", "locked_components",
    "ChildSpec", "mutate", "mutate_hparams", "sample_parent", "accuracy_scorer", "make_scorer",
    "size_penalty_scorer", "TrainBudget", "TrainResult", "train_child", "train_step_fn",
]

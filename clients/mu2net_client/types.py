"""Typed results of the SDK."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class AccuracyPoint:
    """One publish of a new best path of a task.

    Attributes:
      system_version: the system version of the publish.
      time: when it was published, unix seconds.
      validation_accuracy: validation accuracy of the path, in [0, 1] (None if unknown).
      test_accuracy: test accuracy of the path, in [0, 1] (None if unknown).
    """

    system_version: int
    time: float
    validation_accuracy: float | None
    test_accuracy: float | None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "AccuracyPoint":
        return cls(system_version=int(doc["system_version"]), time=float(doc["time"]),
                   validation_accuracy=doc.get("validation_accuracy"), test_accuracy=doc.get("test_accuracy"))


@dataclasses.dataclass(frozen=True)
class Task:
    """A task resource.

    Attributes:
      name: task name.
      state: queued | training | serving | failed.
      private: whether its components are withheld from other tasks.
      labels: class names (index = label id).
      system_version: system version of the served path (0 if none).
      path_id: id of the served path, if any.
      iterations_done: completed task iterations.
      metrics: validation/test accuracy (in [0, 1]), activated/trainable parameters, score.
      error: why the task failed, if it did.
      improved_at: unix seconds of the last publish of a new best path (None: never).
      history: every publish of a new best path, oldest first.
      paused: whether continual evolution paused the task (it stopped improving);
        :meth:`Client.evolve` wakes it.
      stale_iterations: completed task iterations in a row without improvement.
      pinned: a user rolled the task back (:meth:`Client.rollback`): it is not evolved
        until :meth:`Client.evolve` wakes it.
      rolled_back_to: in the answer of :meth:`Client.rollback` only: the ``system_version``
        and ``path_id`` the task went back to.
      evolver: what the evolver is doing on this task now (``iteration``, ``generation``,
        ``generations``, ``children_running``, ``phase``, ``updated`` in unix seconds, ...);
        None when it is not training this task.
    """

    name: str
    state: str
    private: bool
    labels: tuple[str, ...]
    system_version: int
    path_id: str | None
    iterations_done: int
    metrics: Mapping[str, Any]
    error: str | None = None
    improved_at: float | None = None
    history: tuple[AccuracyPoint, ...] = ()
    paused: bool = False
    stale_iterations: int = 0
    evolver: Mapping[str, Any] | None = None
    pinned: bool = False
    rolled_back_to: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "Task":
        """From the HTTP task resource; keys an older server does not send get the defaults."""
        evolution = doc.get("evolution") or {}
        evolver = doc.get("evolver")
        return cls(name=doc["name"], state=doc["state"], private=doc["private"], labels=tuple(doc["labels"]),
                   system_version=doc["system_version"], path_id=doc.get("path_id"),
                   iterations_done=doc["iterations_done"], metrics=dict(doc.get("metrics") or {}),
                   error=doc.get("error"), improved_at=doc.get("improved_at"),
                   history=tuple(AccuracyPoint.from_json(p) for p in doc.get("history") or ()),
                   paused=bool(evolution.get("paused", False)),
                   stale_iterations=int(evolution.get("stale_iterations", 0)),
                   evolver=dict(evolver) if evolver else None,
                   pinned=bool(evolution.get("pinned", False)),
                   rolled_back_to=dict(doc["rolled_back_to"]) if doc.get("rolled_back_to") else None)


@dataclasses.dataclass(frozen=True)
class Classification:
    """Top-k of one image: labels, label ids and softmax scores, best first."""

    labels: tuple[str, ...]
    label_ids: tuple[int, ...]
    scores: tuple[float, ...]

    @property
    def label(self) -> str:
        return self.labels[0]


@dataclasses.dataclass(frozen=True)
class ClassifyResult:
    """Results in request order, and the system version and path that answered."""

    results: tuple[Classification, ...]
    system_version: int
    path_id: str

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> Classification:
        return self.results[i]

"""Typed results of the SDK."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


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
      metrics: validation/test accuracy, activated/trainable parameters, score.
      error: why the task failed, if it did.
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

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "Task":
        return cls(name=doc["name"], state=doc["state"], private=doc["private"], labels=tuple(doc["labels"]),
                   system_version=doc["system_version"], path_id=doc.get("path_id"),
                   iterations_done=doc["iterations_done"], metrics=dict(doc.get("metrics") or {}),
                   error=doc.get("error"))


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

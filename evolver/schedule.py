"""Which task becomes active next (the evolver's queue).

Order, first match wins:

1. a task that has never been served (a new upload always comes first), oldest first;
2. a task with fewer than the configured task iterations, fewest first, then oldest (the
   paper's fixed number of task iterations per task, Sections 4 and 5);
3. with continual evolution (the default of ``mu2net serve``): any task that is not
   paused, least recently improved first. A task pauses after ``patience`` completed
   iterations in a row that published nothing better, and wakes when a task whose paths
   it may use (public, or of its ACL group) publishes after it paused, or when a user asks
   (``POST /v1/tasks/{name}/evolve``).

Failed tasks are never chosen, nor a task backing off after a crashed phase (until its
``retry_after``), nor a task a user rolled back and pinned (until the user wakes it).
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

from mu2net.store import TaskRecord


def related(task: TaskRecord, other: TaskRecord) -> bool:
    """Whether ``task`` may use ``other``'s paths (privacy, paper Section 3.4)."""
    return other.name != task.name and (not other.private or other.acl_group == task.acl_group)


def woken(task: TaskRecord, tasks: Sequence[TaskRecord], served_versions: Mapping[str, int]) -> bool:
    """Whether a paused ``task`` should wake: a related task published after it paused."""
    if task.paused_version is None:
        return False
    return any(related(task, o) and served_versions.get(o.name, -1) > task.paused_version for o in tasks)


def is_live(task: TaskRecord, now: float) -> bool:
    """Whether the evolver may run ``task`` at unix time ``now``: not failed, not pinned by a
    rollback, and not backing off after a raising phase (``retry_after``)."""
    return task.state != "failed" and not task.pinned and (task.retry_after is None or task.retry_after <= now)


def next_task(tasks: Sequence[TaskRecord], served_versions: Mapping[str, int], iterations: int,
              continual: bool, now: float | None = None) -> TaskRecord | None:
    """The next active task (see the module docstring), or None if there is nothing to do.

    Args:
      tasks: every task of the store.
      served_versions: task name -> system version of its served path (see
        :meth:`mu2net.store.Store.served_versions`); a task missing here was never served.
      iterations: task iterations every task gets before continual evolution.
      continual: keep evolving served tasks after their ``iterations``.
      now: unix time compared with each task's ``retry_after`` (default: the clock).
    """
    now = time.time() if now is None else now
    live = [t for t in tasks if is_live(t, now)]
    new = [t for t in live if t.name not in served_versions]
    if new:
        return min(new, key=lambda t: t.seq)
    todo = [t for t in live if t.iterations_done < iterations]
    if todo:
        return min(todo, key=lambda t: (t.iterations_done, t.seq))
    if not continual:
        return None
    awake = [t for t in live if t.paused_version is None or woken(t, live, served_versions)]
    return min(awake, key=lambda t: (t.improved_at or 0.0, t.seq)) if awake else None

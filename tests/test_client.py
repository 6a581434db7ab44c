"""The SDK without a server: task resources of older and newer servers, and argument checks
that run before any request."""

from __future__ import annotations

import asyncio

import pytest

from mu2net_client import AccuracyPoint, AsyncClient, Client, InvalidArgumentError, Task

UNREACHABLE = ("127.0.0.1:1", "http://127.0.0.1:1")  # nothing listens: any request would fail

OLD_SERVER_TASK = {"name": "digits", "state": "serving", "private": False, "labels": ["0", "1"],
                   "system_version": 3, "path_id": "abc", "iterations_done": 1,
                   "metrics": {"test_accuracy": 0.5}, "error": None}


def test_task_from_an_older_server_gets_defaults():
    task = Task.from_json(OLD_SERVER_TASK)
    assert (task.improved_at, task.history, task.paused, task.stale_iterations, task.evolver) == \
        (None, (), False, 0, None)
    assert task.metrics == {"test_accuracy": 0.5} and task.labels == ("0", "1")


def test_task_from_json_reads_history_evolution_and_evolver():
    doc = {**OLD_SERVER_TASK, "improved_at": 1700000100.5,
           "history": [{"system_version": 2, "time": 1700000000.0, "validation_accuracy": 0.4, "test_accuracy": 0.3},
                       {"system_version": 3, "time": 1700000100.5, "validation_accuracy": 0.6,
                        "test_accuracy": None}],
           "evolution": {"paused": True, "stale_iterations": 4},
           "evolver": {"state": "training", "task": "digits", "iteration": 2, "generation": 1}}
    task = Task.from_json(doc)
    assert task.history == (AccuracyPoint(2, 1700000000.0, 0.4, 0.3), AccuracyPoint(3, 1700000100.5, 0.6, None))
    assert task.improved_at == 1700000100.5 and task.paused and task.stale_iterations == 4
    assert task.evolver == doc["evolver"] and task.evolver is not doc["evolver"]


@pytest.mark.parametrize("accuracy, metric, match", [
    (0.5, "accuracy", r"metric='accuracy'; allowed: 'test_accuracy', 'validation_accuracy'"),
    (1.5, "test_accuracy", r"accuracy=1\.5; allowed: a fraction in \[0, 1\]"),
    (-0.1, "validation_accuracy", r"accuracy=-0\.1; allowed: a fraction in \[0, 1\]"),
])
def test_wait_until_rejects_bad_targets_before_any_request(accuracy, metric, match):
    with Client(*UNREACHABLE, retries=0) as client:
        with pytest.raises(InvalidArgumentError, match=match) as e:
            client.wait_until("digits", accuracy, metric=metric, timeout=1, progress=False)
    assert isinstance(e.value, ValueError)

    async def main():
        async with AsyncClient(*UNREACHABLE, retries=0) as client:
            with pytest.raises(InvalidArgumentError, match=match):
                await client.wait_until("digits", accuracy, metric=metric, timeout=1, progress=False)

    asyncio.run(main())

"""kill -9 of a real server (and of its evolver) at random moments during uploads, publishes
and deletes: nothing acknowledged is lost, the store stays consistent, and it resumes
(benchmarks/crash.py; its long run is in docs/reliability.md)."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import crash  # noqa: E402


def test_random_kills_lose_nothing_acknowledged_and_leave_a_consistent_store(tmp_path):
    lines: list[str] = []
    # aimed kills with no delay: each lands while its upload or delete is unanswered
    result = crash.run(str(tmp_path / "store"), rounds=4, seed=1, max_delay=6.0, evolver_every=2, aimed=0.5,
                       aim_delay=0.0, log=lines.append)
    assert result["rounds"] == 4 and result["kills_evolver_then_server"] == 2, lines
    assert result["kills_aimed"] >= 1 and result["kills_aimed_landed"] == result["kills_aimed"], (result, lines)
    # an upload killed while the server received or ingested it (a new spool file seen)
    assert result["kills_aimed_spooled"] >= 1, (result, lines)
    assert result["details"] == [], result["details"]
    for key in ("published_paths_lost", "uploads_acknowledged_then_lost", "orphan_files_after_sweep", "store_problems",
                "bit_identical_failed"):
        assert result[key] == 0, (key, result["details"])
    assert result["resumed_tasks"] >= 1  # something was uploaded, and every remaining task serves again
    assert result["bit_identical_checked"] >= 1, lines  # a path survived a kill and was compared


def test_verify_reports_a_damaged_store(tiny_store):
    from conftest import TINY_EVOLVER
    from mu2net.evolver import Evolver

    Evolver(tiny_store, TINY_EVOLVER, progress=False).active_phase("digits")
    assert tiny_store.verify() == []
    comp = tiny_store.get_components([tiny_store.best_path("digits").component_ids[-1]])[0]
    f = tiny_store.data_dir / "arrays" / comp.params_digest[:2] / f"{comp.params_digest}.npz"
    f.write_bytes(f.read_bytes()[:-1] + b"x")
    assert tiny_store.verify() == [f"component {comp.id}: array file {comp.params_digest} does not match its digest"]
    f.unlink()
    assert tiny_store.verify() == [f"component {comp.id}: array file {comp.params_digest} is missing"]

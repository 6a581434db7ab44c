"""kill -9 at random moments during uploads, publishes and deletes, then restart: what the
store keeps (issue 17's fault figures, docs/reliability.md).

Each round starts a real ``mu2net serve`` (a tiny ViT on sklearn-digits tasks, so a round
takes seconds, with continual evolution: the evolver is always training or publishing) on
one store. A client thread uploads tasks over HTTP, deletes some, and polls what each task
serves. After a random delay (1 to ``--max-delay`` s) the harness SIGKILLs the server (its
evolver then gets the SIGTERM of its parent-death signal and exits at once), or, every
``--evolver-every``-th round, SIGKILLs the evolver process first and then the server, so
neither cleans up. Kills land wherever the random moment falls (training, a file write, a
publish transaction, an upload's ingestion, a delete); the round records what the client
had in flight. A share ``--aimed`` of the rounds (default 0.5: a seeded coin per round)
aims the kill at the client instead: the harness asks the client for an upload or a
delete, waits until it is in flight (an upload: until the server starts receiving its body,
i.e. a new spool file exists, counted as ``kills_aimed_spooled``) and kills 0 to ``--aim-delay`` s later (while it is received,
ingested or committed, or just after its answer; ``kills_aimed_landed`` counts the kills
after which the client never got the answer). Then, with no process running:

* the start-up sweep runs (:meth:`mu2net.store.Store.remove_orphans` with its default
  ages, what ``mu2net serve`` does at start; the count it removed is reported), and the
  files it should have removed are counted independently afterwards: temporary files,
  ``.upload`` spool files and unreferenced array files must be 0 (*orphans left after the
  start-up check*); dataset and upload directories younger than an hour are kept by design
  (another server may be writing them) and reported;
* :meth:`mu2net.store.Store.verify` must find no problem (SQLite integrity, every component's
  array files present and matching their digests, every path's components in the pool,
  every task's dataset directory present, the system version not behind the history);
* the system version never goes back between rounds;
* every task seen served before the kill (and not deleted with a 200 answer, nor requeued by
  one) still serves that path or one published later (*published paths lost*);
* every upload answered 202 is still a task unless it was then deleted (*uploads
  acknowledged then lost*); every task's splits read back from disk with the recorded
  number of examples;
* at the next start, each task still on a path seen before answers a fixed probe batch with
  bit-identical scores over gRPC.

Before the first round a server serves a first task (so every round has a published path
to lose); at the end a last server runs until every remaining task serves again
(resumption); a task the crash-loop guard ended ``failed`` (``MAX_PHASE_ATTEMPTS`` phases in
a row whose evolver process died: a SIGKILL of the evolver cannot be told from a crash) is
reported instead.

    python benchmarks/crash.py --rounds 50 --out docs/crash.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from mu2net import datasets as D
from mu2net.server.launcher import RunningServer
from report import write_json
from mu2net.store import Store

#: ``mu2net serve`` flags of the harness: a tiny ViT for 8x8 digits, short children.
SERVE_ARGS = ["--image-size", "8", "--patch-size", "4", "--width", "16", "--mlp-dim", "32", "--num-heads", "2",
              "--generations", "2", "--children", "2", "--cycles", "2", "--sample-cap", "256",
              "--batch-size", "32", "--quiet", "--iterations", "1", "--root-hparam", "flip=false",
              "--root-hparam", "crop=false", "--root-hparam", "mu=0.3", "--root-hparam", "learning_rate=0.05",
              "--root-blocks", "0", "--first-answer-epochs", "0"]

#: Label maps of the uploaded tasks (sklearn digits, 0-9).
LABELINGS = {"digits": lambda y: y, "parity": lambda y: y % 2, "ge5": lambda y: (y >= 5).astype(int),
             "mod3": lambda y: y % 3}


@functools.lru_cache(maxsize=1)
def _digits() -> Any:
    """sklearn's digits, read from its package once per process."""
    from sklearn.datasets import load_digits

    return load_digits()


def digits_upload(labeling: str, seed: int) -> dict[str, np.ndarray]:
    """An upload body (the SDK sends it as .npz): 450 sklearn digits images, 8x8 uint8."""
    d = _digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(d.target))[:450]
    x = np.round(d.images[idx] * (255 / 16)).astype(np.uint8)[:, :, :, None]
    y = LABELINGS[labeling](d.target[idx]).astype(np.int64)
    return {"x_train": x[:350], "y_train": y[:350], "x_test": x[350:], "y_test": y[350:]}


def spool_files(data_dir: str) -> set[str]:
    """The store's upload spool files (``uploads-*/*.upload``): the server creates one when it
    starts receiving an upload's body and removes it just before the answer; a killed
    server's stay until the start-up sweep."""
    return set(glob.glob(os.path.join(data_dir, "uploads-*", "*.upload")))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


class Workload(threading.Thread):
    """Uploads, deletes and polls against one running server until stopped; records what
    the server acknowledged (the harness's ground truth after the kill)."""

    def __init__(self, server: RunningServer, state: dict[str, Any], rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.server, self.state, self.rng = server, state, rng
        self.stop_flag = threading.Event()
        self.in_flight: str | None = None
        #: set by the harness to "upload" or "delete" (an upload when no more than 2 tasks are
        #: left to delete): the next action, taken when the thread next wakes
        self.want: str | None = None
        #: set once the wanted action is in flight (``in_flight`` names it until it is answered)
        self.aimed_started = threading.Event()
        #: set once the wanted action got its answer (never, if the kill came first)
        self.aimed_answered = threading.Event()
        #: ends the pause between two actions early (the harness wants one)
        self.wake = threading.Event()

    def _aimed_call(self, aimed: bool, call: Any, *args: Any) -> Any:
        """``call(*args)``; an error answer of the server (not a transport failure or a timeout)
        counts as an answer: for the wanted action it sets :attr:`aimed_answered`, and the
        result is None. A transport failure (the kill) propagates."""
        from mu2net_client import Mu2netError, TimeoutError, TransportError

        try:
            return call(*args)
        except (TransportError, TimeoutError):
            raise
        except Mu2netError:
            if aimed:
                self.aimed_answered.set()
            return None

    def run(self) -> None:
        from mu2net_client import Client, Mu2netError

        st = self.state
        try:
            with Client(self.server.grpc, self.server.http, timeout=10, retries=0) as client:
                while not self.stop_flag.is_set():
                    for t in client.tasks():  # what each task serves now
                        if t.path_id is not None:
                            st["served"][t.name] = (t.system_version, t.path_id)
                    names = [n for n in st["acked"] if n not in st["deleted"]]
                    action = self.rng.random()
                    aimed = self.want is not None
                    if aimed:  # the harness aims this round's kill at the client
                        action = 0.3 if self.want == "delete" and len(names) > 2 else 0.0
                        self.want = None
                    if action < 0.25 or not names:
                        st["uploads"] += 1
                        name = f"{self.rng.choice(sorted(LABELINGS))}-{st['uploads']}"
                        body = digits_upload(name.split("-")[0], st["uploads"])
                        self.in_flight = f"upload {name}"
                        if aimed:
                            self.aimed_started.set()
                        task = self._aimed_call(aimed, client.upload, name, body)
                        if task is not None:
                            st["acked"].append(task.name)
                    elif action < 0.35 and len(names) > 2:
                        name = self.rng.choice(names)
                        self.in_flight = f"delete {name}"
                        st["deleting"] = name
                        if aimed:
                            self.aimed_started.set()
                        answer = self._aimed_call(aimed, client.delete, name)
                        if answer is None:  # refused with an answer: the task stays
                            st["deleting"] = None
                            self.in_flight = None
                            continue
                        st["deleted"].append(name)
                        # tasks whose path used its components lost that path with it (Section 3.4) and
                        # are queued again: not a loss
                        for lost in [name, *answer.get("requeued", [])]:
                            st["served"].pop(lost, None)
                        st["deleting"] = None
                    if aimed:
                        self.aimed_answered.set()
                    self.in_flight = None
                    self.wake.wait(self.rng.uniform(0.2, 1.5))
                    self.wake.clear()
        except (Mu2netError, OSError):
            pass  # the server was killed under a request: its outcome is checked from the store


def probe_scores(server: RunningServer, names: list[str]) -> dict[str, tuple[str, list[list[float]]]]:
    """Each task's served path id and its top-k scores (all classes) on a fixed probe batch."""
    from mu2net_client import Client, Mu2netError

    x = digits_upload("digits", 0)["x_test"][:16]
    out = {}
    with Client(server.grpc, server.http, timeout=30) as client:
        for name in names:
            try:
                task = client.task(name)
                r = client.classify(name, x, top_k=len(task.labels))
            except Mu2netError:
                continue
            out[name] = (r.path_id, [sorted(zip(c.label_ids, c.scores)) for c in r.results])
    return out


def _leftovers(data_dir: str, store: Store) -> tuple[int, int]:
    """What a sweep should have removed, counted independently of it: (temporary, spool and
    unreferenced array files outside the directories kept by design, and those directories:
    dataset and upload directories no task uses, which the sweep keeps while younger than an
    hour)."""
    live = {d for c in store.list_components() for d in (c.params_digest, c.opt_digest) if d}
    root = Path(data_dir)
    used = {Path(t.dataset_dir).name for t in store.list_tasks()}
    dirs = [d for d in (root / "datasets").iterdir() if d.is_dir() and d.name not in used] \
        if (root / "datasets").exists() else []
    kept = dirs + [d for d in root.glob("uploads-*") if d.is_dir()]  # young: kept by design, with their files
    files = [f for f in root.rglob("*") if f.is_file() and not any(k in f.parents for k in kept) and (
        f.name.endswith(".tmp") or f.name.endswith(".upload")
        or (f.parent.parent.name == "arrays" and f.suffix == ".npz" and f.stem not in live))]
    return len(files), len(kept)


def check_after_kill(data_dir: str, state: dict[str, Any]) -> dict[str, Any]:
    """The checks of the module docstring that need no server; returns counts and problems."""
    D._CACHE.clear()  # read every split from disk again, not from this process's cache
    with Store(data_dir) as store:
        swept = store.remove_orphans()  # the start-up sweep of ``mu2net serve``, nothing else running
        files_left, dirs_left = _leftovers(data_dir, store)
        problems = store.verify()
        version = store.system_version()
        if version < state["version"]:
            problems.append(f"system version went back from {state['version']} to {version}")
        state["version"] = version
        tasks = {t.name: t for t in store.list_tasks()}
        served = store.served_versions()  # task -> system version its served path was published at
        published = {h["path_id"]: h["system_version"] for h in store.history()}
        lost_paths = []
        # a delete in flight that went through requeued the tasks that used its components
        # (their paths went with it); which ones, its lost answer would have said
        deleted_in_flight = state["deleting"] is not None and state["deleting"] not in tasks
        for name, (_, path_id) in list(state["served"].items()):
            if name in state["deleted"] or name == state["deleting"]:
                continue
            if deleted_in_flight and name in tasks and name not in served and tasks[name].iterations_done == 0:
                continue
            seen = published.get(path_id)
            if name not in served or seen is None or served[name] < seen:
                lost_paths.append(f"{name}: served path {path_id[:8]} (published at v{seen}), now "
                                  f"{'none' if name not in served else f'published at v{served[name]}'}")
        lost_uploads = [n for n in state["acked"] if n not in state["deleted"] and n != state["deleting"]
                        and n not in tasks]
        for name, t in tasks.items():
            try:
                n = sum(len(D.read_split(t.dataset_dir, t.splits[split])[1])
                        for split in ("train", "validation", "test"))
            except Exception as e:  # a half-written dataset of an acknowledged upload
                problems.append(f"task {name}: a split is unreadable: {e}")
                continue
            if n != sum(t.num_examples.values()):
                problems.append(f"task {name}: {n} examples read back, {sum(t.num_examples.values())} recorded")
    return {"swept": swept, "orphan_files_after_sweep": files_left, "young_dirs_kept": dirs_left,
            "problems": problems, "lost_paths": lost_paths, "lost_uploads": lost_uploads, "tasks": set(tasks),
            "unserved": {n for n in tasks if n not in served}}


def run(data_dir: str, rounds: int, seed: int = 0, max_delay: float = 12.0, evolver_every: int = 3,
        aimed: float = 0.5, aim_delay: float = 0.15, log: Any = print) -> dict[str, Any]:
    """Runs ``rounds`` kill rounds on the store ``data_dir`` (created if new); returns the
    figures (see the module docstring). A share ``aimed`` (0 to 1) of the rounds aims its
    kill at the client: it asks for an upload (or, with probability 1/3, a delete; an upload
    when no more than 2 tasks are left), waits until it is in flight (an upload: until the
    server starts receiving its body) and kills 0 to ``aim_delay`` s later; ``kills_aimed_landed``
    counts the aimed kills whose action the client never got an answer to."""
    rng = random.Random(seed)
    state: dict[str, Any] = {"acked": [], "deleted": [], "deleting": None, "served": {}, "uploads": 0, "version": 0}
    recorded: dict[str, tuple[str, list]] = {}  # task -> (path id, scores) from the last round
    totals = {"rounds": 0, "kills_server": 0, "kills_evolver_then_server": 0, "kills_aimed": 0,
              "kills_aimed_spooled": 0, "kills_aimed_landed": 0, "in_flight": {},
              "published_paths_lost": 0, "uploads_acknowledged_then_lost": 0, "orphans_removed_by_sweep": 0,
              "orphan_files_after_sweep": 0, "young_dirs_kept_at_end": 0, "store_problems": 0, "bit_identical_checked": 0,
              "bit_identical_failed": 0, "details": []}
    # a first task served before the first kill, so every round has a published path to lose
    server = RunningServer(data_dir, SERVE_ARGS)
    try:
        from mu2net_client import Client

        with Client(server.grpc, server.http, timeout=30) as client:
            if not client.tasks():
                state["uploads"] += 1
                state["acked"].append(client.upload("digits-0", digits_upload("digits", 0)).name)
            for t in client.tasks():
                t = client.wait_until_serving(t.name, timeout=600, progress=False)
                state["served"][t.name] = (t.system_version, t.path_id)
        recorded = probe_scores(server, sorted(state["served"]))
    finally:
        server.stop()
    for r in range(rounds):
        server = RunningServer(data_dir, SERVE_ARGS)
        try:
            # tasks still on a path of the last round answer bit-identically
            now = probe_scores(server, sorted(recorded))
            for name, (pid, scores) in now.items():
                if recorded[name][0] == pid:
                    totals["bit_identical_checked"] += 1
                    if scores != recorded[name][1]:
                        totals["bit_identical_failed"] += 1
                        totals["details"].append(f"round {r}: {name} on {pid[:8]} answered differently")
            work = Workload(server, state, random.Random(rng.random()))
            work.start()
            time.sleep(rng.uniform(1.0, max_delay))
            recorded = probe_scores(server, [n for n in list(state["served"]) if n not in state["deleted"]])
            time.sleep(rng.uniform(0.0, 1.0))
            wanted = None
            if aimed and rng.random() < aimed:  # (no draw with aimed=0: earlier seeds' rounds are unchanged)
                wanted = "delete" if rng.random() < 1 / 3 else "upload"
                delay = rng.uniform(0.0, aim_delay)  # drawn whatever happens next: the seed's rounds stay fixed
                earlier_spools = spool_files(data_dir)  # killed servers' spool files stay (young directories)
                work.want = wanted
                work.wake.set()
                deadline = time.time() + 30
                while work.is_alive() and not work.aimed_started.wait(0.05) and time.time() < deadline:
                    pass
                if not work.aimed_started.is_set():
                    wanted = None  # the client never started it (it failed first): not an aimed kill
                elif (work.in_flight or "").startswith("upload"):  # until the server starts receiving it
                    while (work.is_alive() and not work.aimed_answered.is_set() and time.time() < deadline
                           and not spool_files(data_dir) - earlier_spools):
                        time.sleep(0.001)
                    if not work.is_alive():
                        wanted = None  # the client failed: not an aimed kill
                    elif spool_files(data_dir) - earlier_spools and not work.aimed_answered.is_set():
                        totals["kills_aimed_spooled"] += 1
                if wanted is not None:
                    totals["kills_aimed"] += 1
                    time.sleep(delay)
            doing = work.in_flight or "evolver only"
            evolvers = _children(server.proc.pid)
            if evolver_every and r % evolver_every == evolver_every - 1 and evolvers:
                for pid in evolvers:
                    os.kill(pid, signal.SIGKILL)
                totals["kills_evolver_then_server"] += 1
            else:
                totals["kills_server"] += 1
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(30)
            work.stop_flag.set()
            work.wake.set()
            work.join(30)
            if wanted is not None and not work.aimed_answered.is_set():
                totals["kills_aimed_landed"] += 1  # the client never got the wanted action's answer
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
        deadline = time.time() + 30  # the evolver goes with its server (PDEATHSIG)
        while any(os.path.exists(f"/proc/{p}") for p in evolvers) and time.time() < deadline:
            time.sleep(0.1)
        for pid in evolvers:  # nothing may write while the store is checked
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        kind = doing.split(" ")[0]
        totals["in_flight"][kind] = totals["in_flight"].get(kind, 0) + 1
        c = check_after_kill(data_dir, state)
        totals["rounds"] += 1
        totals["published_paths_lost"] += len(c["lost_paths"])
        totals["uploads_acknowledged_then_lost"] += len(c["lost_uploads"])
        totals["orphans_removed_by_sweep"] += sum(c["swept"].values())
        totals["orphan_files_after_sweep"] += c["orphan_files_after_sweep"]
        totals["young_dirs_kept_at_end"] = c["young_dirs_kept"]
        totals["store_problems"] += len(c["problems"])
        for key in ("lost_paths", "lost_uploads", "problems"):
            totals["details"] += [f"round {r}: {x}" for x in c[key]]
        log(f"round {r + 1}/{rounds}: killed during {doing}; swept {c['swept']}; problems {len(c['problems'])}, "
            f"paths lost {len(c['lost_paths'])}, uploads lost {len(c['lost_uploads'])} {c['lost_paths']}; "
            f"bit-identical so far {totals['bit_identical_checked'] - totals['bit_identical_failed']}/"
            f"{totals['bit_identical_checked']}")
        # a task deleted in flight either went or stayed: both are fine
        if state["deleting"] is not None and state["deleting"] not in c["tasks"]:
            state["deleted"].append(state["deleting"])
            for name in [state["deleting"], *c["unserved"]]:  # the deleted task, and those it requeued
                state["served"].pop(name, None)
        state["deleting"] = None
    # resumption: every remaining task serves again
    with Store(data_dir) as store:
        remaining = [t.name for t in store.list_tasks()]
    server = RunningServer(data_dir, SERVE_ARGS)
    t0 = time.time()
    try:
        from mu2net_client import Client

        from mu2net_client import ServerError

        failed = {}
        with Client(server.grpc, server.http, timeout=30) as client:
            for name in remaining:
                try:
                    client.wait_until_serving(name, timeout=600, progress=False)
                except ServerError as e:  # ended failed: the crash-loop guard (reported, not a loss)
                    failed[name] = str(e)
        totals["resumed_tasks"] = len(remaining) - len(failed)
        totals["tasks_failed_by_kills"] = failed
        totals["resume_seconds"] = round(time.time() - t0, 1)
    finally:
        server.stop()
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=12.0, help="most seconds from a start to its kill")
    ap.add_argument("--evolver-every", type=int, default=3,
                    help="every N-th round SIGKILLs the evolver process before the server (0: never)")
    ap.add_argument("--aimed", type=float, default=0.5,
                    help="share of rounds whose kill is aimed at an upload or delete in flight (0 to 1)")
    ap.add_argument("--aim-delay", type=float, default=0.15,
                    help="most seconds from the aimed action's start to the kill")
    ap.add_argument("--data-dir", default=None, help="store directory (default: a new temporary one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: allowed: an integer >= 1")
    if not 0 <= args.aimed <= 1:
        ap.error(f"--aimed {args.aimed}: allowed: a share from 0 to 1")
    if args.aim_delay < 0:
        ap.error(f"--aim-delay {args.aim_delay}: allowed: seconds >= 0")
    data_dir = args.data_dir or os.path.join(tempfile.mkdtemp(prefix="mu2net-crash-"), "store")
    t0 = time.time()
    result = {"config": vars(args), "serve_args": SERVE_ARGS,
              **run(data_dir, args.rounds, args.seed, args.max_delay, args.evolver_every, args.aimed, args.aim_delay,
                    log=lambda m: print(m, flush=True))}
    result["seconds"] = round(time.time() - t0, 1)
    write_json(result, args.out)


if __name__ == "__main__":
    main()

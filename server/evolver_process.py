"""The evolver process supervised by ``mu2net serve``: runs task iterations forever.

It shares nothing with the server but the store: it picks up tasks uploaded over HTTP
(queued in the store; a new one starts at the next generation boundary of the running
phase), runs their task iterations, publishes every improvement, and with ``--continual``
(the default of ``mu2net serve``) keeps evolving the least recently improved awake task
after every task has its iterations; it sleeps only when every task is done or paused. Killed at any moment, the next start continues from the last
published state.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Sequence


def die_with_parent(parent: int) -> None:
    """Makes this process get SIGTERM when ``parent`` dies (Linux ``prctl(PR_SET_PDEATHSIG)``;
    elsewhere a thread polls the parent pid every second); exits at once if it is gone already."""
    import threading

    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    if os.getppid() != parent:
        print(f"evolver: the server process {parent} is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    from mu2net import cli
    from mu2net.evolver import Evolver
    from mu2net.server.compute import split_cpu_devices
    from mu2net.store import EvolverRunning, Store, evolver_lock

    parser = argparse.ArgumentParser(prog="mu2net-evolver")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    parser.add_argument("--continual", action="store_true",
                        help="keep running task iterations after --iterations while a task is awake")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the server) dies, even by SIGKILL")
    cli.add_evolver_args(parser)
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s evolver %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    split_cpu_devices(args.cpu_devices)  # before anything creates the JAX backend
    try:
        lock = evolver_lock(args.data_dir)  # noqa: F841 (one evolver per store; held until exit)
    except EvolverRunning as e:
        print(f"evolver: {e}", file=sys.stderr, flush=True)
        return 3
    store = Store(args.data_dir)
    args.preempt = True  # serving: a new upload starts at the next generation boundary
    try:
        ray = cli.ray_children(args)
    except Exception as e:  # no cluster there, ray not installed, or another ray version
        print(f"evolver: --ray-address {args.ray_address!r}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    evolver = Evolver(store, cli.evolver_config(args), progress=not args.quiet, ray=ray)

    def stopped(signum: int, frame: object) -> None:
        # the server's status must not keep showing the phase this process was killed in, and a
        # phase stopped on purpose is no crash (Store.begin_attempt)
        try:
            store.abandon_transaction()  # the signal may have come inside one of the phase's
            if evolver.active_task is not None:
                store.cancel_attempt(evolver.active_task)
            store.set_evolver_status({"state": "stopped", "task": None, "phase": "stopped",
                                      "updated": time.time(), "pid": os.getpid()})
        except Exception as e:  # e.g. inside a transaction of the interrupted phase: exit anyway
            print(f"evolver: could not record its stop: {e!r}", file=sys.stderr, flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stopped)
    while True:
        if evolver.run(args.iterations, continual=args.continual) == 0:
            time.sleep(args.poll_seconds)


if __name__ == "__main__":
    sys.exit(main())

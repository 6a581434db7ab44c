"""Anytime serving, measured as a user sees it: a real ``mu2net serve`` (default flags), a
dataset uploaded over HTTP with the SDK, and the test split classified over gRPC.

Scenarios (``--scenario``):

* ``fresh``: a new server (root model only) is given MNIST-5k.
* ``warm``: a new server started with MNIST-5k and Fashion-MNIST (``--task``) is given
  digits once both of those serve (the evolver is then busy with them).

Reported per scenario: seconds from the upload's answer to the first served answer (the
first classify that succeeds), then at the first answer and at each ``--at`` minute mark the
system version that answered and the test accuracy of the served path, computed from the
classify answers on the uploaded test split (not from the server's own metrics). The
evolver status at each mark shows whether it is still working on the task.

    python benchmarks/anytime.py --scenario fresh --at 1,5,10,20 --out docs/anytime_fresh.json
    python benchmarks/anytime.py --scenario warm --at 1,5,10 --out docs/anytime_warm.json
    python benchmarks/anytime.py --scenario store --data-dir data --at 15,30,60,120 \
        --out docs/anytime_mainjob.json --svg docs/anytime_mainjob.svg   # the main job's store

The run needs the machine to itself (it measures wall-clock time).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import numpy as np

from mu2net.ingest import load_source
from mu2net.server.launcher import RunningServer
from report import write_json


def upload_arrays(source: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A built-in dataset as the arrays a user uploads (the SDK sends them as one .npz: train
    and test; the server takes validation from train), with its test split."""
    splits, names = load_source(source)
    x_train, y_train = splits["train"]
    x_test, y_test = splits["test"]
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
              "label_names": np.array(names)}
    return arrays, x_test, y_test


def test_accuracy(client: Any, task: str, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Accuracy of the served path on (x, y), classified over gRPC in batches of 256; and the
    system version that answered the last batch."""
    correct, version = 0, 0
    for i in range(0, len(x), 256):
        result = client.classify(task, x[i:i + 256])
        correct += sum(int(r.label_ids[0]) == int(t) for r, t in zip(result.results, y[i:i + 256]))
        version = result.system_version
    return correct / len(x), version


def measure(server: RunningServer, task: str, source: str, marks_min: list[float]) -> dict[str, Any]:
    from mu2net_client import Client, NotReadyError

    body, x_test, y_test = upload_arrays(source)
    with Client(server.grpc, server.http) as client:
        t_upload = time.monotonic()
        client.upload(task, body)
        t_answer, wall_answer = time.monotonic(), time.time()
        while True:
            try:
                client.classify(task, x_test[:1])
                break
            except NotReadyError:
                time.sleep(0.25)
        first = time.monotonic() - t_answer
        acc, version = test_accuracy(client, task, x_test, y_test)
        points = [{"minutes": round(first / 60, 3), "system_version": version, "test_accuracy": acc,
                   "label": "first answer"}]
        print(f"[{task}] first answer {first:.1f} s after the upload's answer "
              f"(upload took {t_answer - t_upload:.1f} s): test {acc:.4f} (v{version})", flush=True)
        for m in marks_min:
            time.sleep(max(0.0, t_answer + 60 * m - time.monotonic()))
            acc, version = test_accuracy(client, task, x_test, y_test)
            view = client.task(task)
            points.append({"minutes": m, "system_version": version, "test_accuracy": acc,
                           "iterations_done": view.iterations_done, "paused": view.paused,
                           "evolver": client.system().get("evolver")})
            print(f"[{task}] {m:g} min: test {acc:.4f} (v{version}, {view.iterations_done} iteration(s), "
                  f"evolver on {(points[-1]['evolver'] or {}).get('task')})", flush=True)
        history = [dict(seconds_after_upload=round(h.time - wall_answer, 1),
                        system_version=h.system_version, validation_accuracy=h.validation_accuracy,
                        test_accuracy=h.test_accuracy) for h in client.task(task).history]
    return {"task": task, "source": source, "upload_seconds": round(t_answer - t_upload, 2),
            "first_answer_seconds": round(first, 2), "points": points,
            "publishes": history}


def store_curve(data_dir: str, marks_min: list[float]) -> tuple[dict[str, Any], str]:
    """Each task's published accuracy over time from a store's publish history (e.g. the
    main job's): per task, the served path's validation and test accuracy at each minute
    mark after the store's first publish, every publish, and an SVG chart per task."""
    from mu2net.server.page import accuracy_svg
    from mu2net.store import Store

    with Store(data_dir) as store:
        history = store.history()
        records = store.list_tasks()
        tasks = [t.name for t in records]
        iterations = {t.name: t.iterations_done for t in records}
        trained = {t.name: t.samples_trained for t in records}
    if not history:
        raise SystemExit(f"store {data_dir} has published no task path yet (empty history)")
    t0 = min(h["time"] for h in history)
    out: dict[str, Any] = {"data_dir": data_dir, "minutes_covered": round((max(h["time"] for h in history) - t0) / 60, 1),
                           "tasks": {}}
    for name in tasks:
        points = [h for h in history if h["task"] == name]
        marks = []
        for m in marks_min:
            served = [h for h in points if h["time"] - t0 <= 60 * m]
            if served:
                last = served[-1]
                # None in a store older than the sample columns (its lineages hold steps the
                # count of trained samples started after)
                share = (last["lineage_samples"] / last["samples_trained"]
                         if last.get("lineage_samples") and last.get("samples_trained")
                         and last["lineage_samples"] <= last["samples_trained"] else None)
                marks.append({"minutes": m, "system_version": last["system_version"],
                              "validation_accuracy": last["validation_accuracy"],
                              "test_accuracy": last["test_accuracy"],
                              # issue 16's lineage share: examples behind the served parameters over
                              # every example the task's children had trained at the mark's last
                              # publish (None: older store); "at_end" counts to the end of the run
                              "lineage_share": None if share is None else round(share, 3)})
        # the served lineage over every example of the children accepted until the store was
        # read (a generation's children are counted at its end, so a run stopped inside one
        # leaves it out): the marks' shares are as of each mark's last publish, so they leave
        # out what was trained after it
        served_lineage = points[-1].get("lineage_samples") if points else None
        end = {"samples_trained": trained[name], "lineage_samples": served_lineage,
               "lineage_share": round(served_lineage / trained[name], 3)
               if served_lineage is not None and trained[name] and served_lineage <= trained[name] else None}
        out["tasks"][name] = {"iterations_done": iterations[name], "publishes": len(points), "at": marks,
                              "at_end": end,
                              "history": [{"minutes": round((h["time"] - t0) / 60, 2), **{k: h[k] for k in (
                                  "system_version", "validation_accuracy", "test_accuracy", "samples_trained",
                                  "lineage_samples")}} for h in points]}
    charts = [accuracy_svg(name, [h for h in history if h["task"] == name]) for name in tasks]
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{300 * len(charts)}" height="150">'
           + "".join(f'<g transform="translate({300 * i} 0)">{c}</g>' for i, c in enumerate(charts)) + "</svg>")
    return out, svg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=("fresh", "warm", "store"), required=True,
                    help="store: read the publish history of --data-dir (no server), e.g. the main job's")
    ap.add_argument("--svg", default=None, help="with --scenario store: write the accuracy charts here")
    ap.add_argument("--at", default="1,5,10", help="minute marks after the upload's answer, comma separated")
    ap.add_argument("--data-dir", default=None, help="store directory (default: a new temporary one)")
    ap.add_argument("--out", default=None)
    ap.add_argument("server_args", nargs="*", help="extra `mu2net serve` flags (after --)")
    args = ap.parse_args()
    try:
        marks = sorted(float(m) for m in args.at.split(","))
    except ValueError:
        ap.error(f"--at {args.at!r}: allowed: comma-separated minutes, e.g. 1,5,10")
    if args.scenario == "store":
        if not args.data_dir:
            ap.error("--scenario store needs --data-dir (a store with published paths)")
        result, svg = store_curve(args.data_dir, marks)
        if args.svg:
            with open(args.svg, "w") as f:
                f.write(svg + "\n")
        write_json(result, args.out)
        return
    data_dir = args.data_dir or tempfile.mkdtemp(prefix=f"mu2net-anytime-{args.scenario}-")
    serve_args = ["--quiet", *args.server_args]
    if args.scenario == "warm":
        serve_args += ["--task", "mnist5k=builtin:mnist5k", "--task", "fashion_mnist=builtin:fashion_mnist"]
    t0 = time.monotonic()
    server = RunningServer(data_dir, serve_args)
    try:
        warm_up = None
        if args.scenario == "warm":
            from mu2net_client import Client

            with Client(server.grpc, server.http) as client:
                for name in ("mnist5k", "fashion_mnist"):
                    client.wait_until_serving(name, progress=False)
                warm_up = {t.name: t.metrics.get("test_accuracy") for t in client.tasks()}
            print(f"warm: both tasks serve after {time.monotonic() - t0:.0f} s: {warm_up}", flush=True)
        task, source = ("digits", "builtin:digits") if args.scenario == "warm" else ("mnist5k", "builtin:mnist5k")
        result = {"scenario": args.scenario, "server_args": serve_args, "warm_up_seconds":
                  round(time.monotonic() - t0, 1) if warm_up else None, "warm_up_test_accuracy": warm_up,
                  **measure(server, task, source, marks)}
    finally:
        server.stop()
    write_json(result, args.out)


if __name__ == "__main__":
    main()

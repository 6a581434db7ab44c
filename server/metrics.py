"""Prometheus metrics of the server (prometheus-client, one registry per server)."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Requests, latency, batch sizes, system version, tasks by state, evolver progress."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mu2net_requests_total", "Requests by API, method and status code.",
                                ["api", "method", "code"], registry=r)
        self.latency = Histogram("mu2net_request_latency_seconds", "Request latency.", ["api", "method"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.batch = Histogram("mu2net_batch_size", "Images per forward call (dynamic batching).",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_paths = Histogram("mu2net_batch_paths",
                                     "Served paths per forward call (cross-task batching merges paths that differ "
                                     "only in their heads).", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.traces = Gauge("mu2net_function_traces", "Traces (each a compilation) of the serving functions in "
                            "this process so far, re-traces included, by function.", ["function"], registry=r)
        self.version = Gauge("mu2net_system_version", "System version being served.", registry=r)
        self.swaps = Counter("mu2net_hot_swaps_total", "Snapshots swapped in.", registry=r)
        self.swap_seconds = Histogram("mu2net_hot_swap_load_seconds", "Time to load, compile and warm a version.",
                                      buckets=(.01, .05, .1, .5, 1, 2, 5, 10, 30, 60), registry=r)
        self.tasks = Gauge("mu2net_tasks", "Tasks by state.", ["state"], registry=r)
        self.iterations = Gauge("mu2net_evolver_task_iterations", "Completed task iterations, all tasks.", registry=r)
        self.evolver_restarts = Counter("mu2net_evolver_restarts_total", "Evolver process restarts.", registry=r)
        self.load_failures = Gauge("mu2net_snapshot_load_failures", "Failed snapshot loads.", registry=r)
        self.in_flight = Gauge("mu2net_requests_in_flight", "Requests being handled now, by API.", ["api"], registry=r)
        self.queued_images = Gauge("mu2net_batcher_queued_images",
                                   "Images queued or running in the forward pass (bounded by --max-queued-images).",
                                   registry=r)
        self.seconds_per_image = Gauge("mu2net_batcher_seconds_per_image",
                                       "Moving average of forward seconds per image over batches at least half full "
                                       "(what deadline-aware admission estimates queue waits from; 0 before one ran).",
                                       registry=r)

    def watch_batcher(self, batcher: Any) -> None:
        """Exports the batcher's queue depth and service time (read at each scrape)."""
        self.queued_images.set_function(lambda: batcher.queued_images)
        self.seconds_per_image.set_function(lambda: batcher.seconds_per_image or 0.0)

    def on_swap(self, old: Any, new: Any, seconds: float) -> None:
        self.version.set(new.version)
        self.swaps.inc()
        self.swap_seconds.observe(seconds)

    def on_batch(self, size: int, paths: int = 1) -> None:
        self.batch.observe(size)
        self.batch_paths.observe(paths)

    def render(self, tasks: list[dict[str, Any]], failures: int) -> bytes:
        for state in ("queued", "training", "serving", "failed"):
            self.tasks.labels(state).set(sum(1 for t in tasks if t["state"] == state))
        self.iterations.set(sum(t["iterations_done"] for t in tasks))
        self.load_failures.set(failures)
        from mu2net.paths import TRACES

        for name in ("probabilities", "grouped_trunk", "grouped_heads"):
            self.traces.labels(name).set(TRACES.counts.get(name, 0))
        return generate_latest(self.registry)

    def observe(self, api: str, method: str) -> Callable[[str, float], None]:
        """Call when a request starts (it counts as in flight); the returned function when it
        ends, with its status code and seconds."""
        self.in_flight.labels(api).inc()

        def done(code: str, seconds: float) -> None:
            self.in_flight.labels(api).dec()
            self.requests.labels(api, method, code).inc()
            self.latency.labels(api, method).observe(seconds)
        return done

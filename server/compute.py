"""XLA's CPU compute resources: the server's thread pool and the evolver's CPU devices.

Thread pool (server process).

JAX sizes the CPU client's intra-op thread pool from the process's CPU affinity mask when
the backend is created (the JAX maintainers' recommended way to bound it:
https://github.com/jax-ml/jax/issues/1539). The server's gRPC event loop, batcher and
HTTP threads need CPU too: with as many compute threads as cores, the compute threads
take the cores those threads need (and for the small models of this project, XLA's
second thread costs more CPU than it saves wall time; see docs/benchmarks.md). The
server therefore creates the backend with one core fewer than the process may use, then
gives every thread the full mask back, so only the pool's size is bounded, not where any
thread runs.

CPU devices (evolver process). The evolver trains the children of a generation in
parallel, one per local JAX device (paper Section 3). On a CPU-only host XLA exposes one
device whose two-thread pool speeds one small child step up by only ~1.15x; splitting the
host into one device per CPU (``--xla_force_host_platform_device_count``) and training a
child on each made one MNIST-5k active phase 1.17x faster and the whole quality experiment
1.57x faster than one child after the other, with the same published paths
(docs/results.md). On a GPU/TPU host the flag only adds CPU devices, which JAX's default
backend does not use, so the accelerators are still the devices children train on.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("mu2net.server.compute")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_compute_threads() -> int:
    """One core for the server's own threads, the rest for XLA: ``max(1, cpus - 1)``."""
    return max(1, available_cpus() - 1)


def limit_compute_threads(threads: int | None = None) -> int:
    """Creates the JAX backend with a CPU compute pool of ``threads`` threads.

    Must run before anything in the process initialises the JAX backend (the first
    ``jax.devices()``, array creation or jitted call); the pool's size is fixed then.

    Args:
      threads: pool size; ``None``: :func:`default_compute_threads`; ``0`` (or at least
        the available CPUs) keeps JAX's default, one thread per available CPU.

    Returns:
      The pool size in effect (the available CPUs when the default is kept or the
      platform has no affinity masks).

    Raises:
      ValueError: for a negative ``threads``.
    """
    if threads is None:
        threads = default_compute_threads()
    if threads < 0:
        raise ValueError(f"compute threads = {threads}; allowed: 0 (one per CPU) or a positive count")
    import jax

    cpus = available_cpus()
    if threads == 0 or threads >= cpus or not hasattr(os, "sched_setaffinity"):
        jax.devices()
        return cpus
    full = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(full)[:threads])
    try:
        jax.devices()  # creates the CPU client, sizing its pool from the mask above
    finally:
        for tid in os.listdir("/proc/self/task"):  # the pool's threads inherited the narrow mask
            try:
                os.sched_setaffinity(int(tid), full)
            except OSError:  # a thread that exited meanwhile
                pass
    log.info("XLA CPU compute pool: %d thread(s) of %d CPUs", threads, cpus)
    return threads


#: The XLA flag that sets how many devices the CPU platform exposes.
HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def split_cpu_devices(count: int | None = None) -> int:
    """Makes the CPU platform expose ``count`` devices, so the evolver trains that many children at once.

    Sets ``XLA_FLAGS`` (:data:`HOST_DEVICE_FLAG`); must run before anything in the process
    initialises the JAX backend. A count already in ``XLA_FLAGS`` is replaced.

    Args:
      count: CPU devices; ``None``: one per available CPU (:func:`available_cpus`).

    Returns:
      The count set.

    Raises:
      ValueError: for a count below 1.
    """
    if count is None:
        count = available_cpus()
    if count < 1:
        raise ValueError(f"CPU devices = {count}; allowed: a positive count")
    flags = re.sub(rf"{HOST_DEVICE_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", "")).split()
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{HOST_DEVICE_FLAG}={count}"])
    log.info("XLA CPU platform: %d device(s)", count)
    return count

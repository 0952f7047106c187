"""Small helpers shared by the actors' stats: percentiles and where a process runs."""

from __future__ import annotations

import socket
from collections.abc import Iterable


def percentile(values: Iterable[float], pct: float) -> float | None:
    """Nearest-rank percentile of `values` (None when empty), rounded to 0.001."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return round(ordered[rank], 3)


def node_address() -> str:
    """The IP address of the Ray node this process runs on (the host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - outside Ray any failure just means "no node"
        pass
    return socket.gethostname()


def node_id() -> str:
    """The Ray node id this process runs on ("local" outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except Exception:  # noqa: BLE001
        pass
    return "local"


def process_resources() -> dict[str, int]:
    """What this process holds now: OS threads, fds, child processes, asyncio tasks.

    Every actor of the pipeline answers `resources()` with this (plus what it owns, such
    as PeerConnections); the leak monitor compares it with a baseline.
    """
    import asyncio

    import psutil

    proc = psutil.Process()
    try:
        fds = proc.num_fds()
    except (AttributeError, psutil.Error):
        fds = -1
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:  # no running loop in this thread
        tasks = 0
    return {
        "threads": proc.num_threads(),
        "fds": fds,
        "subprocesses": len(proc.children(recursive=True)),
        "tasks": tasks,
    }

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

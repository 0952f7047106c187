"""Assignment of streams to encoder actors.

A stream stays on the encoder it is given for its life (DESIGN decision 1); the pool
balances streams across encoders and never puts more than `streams_per_worker` on one.
"""

from __future__ import annotations

from collections.abc import Sequence


class NoCapacity(RuntimeError):
    """Every encoder carries `streams_per_worker` streams already."""


def assign_streams(
    device_ids: Sequence[str], workers: int, streams_per_worker: int
) -> dict[str, int]:
    """Map each device to an encoder index: the least loaded, lowest index first."""
    load = [0] * workers
    out: dict[str, int] = {}
    for device_id in device_ids:
        index = min(range(workers), key=lambda i: (load[i], i))
        if load[index] >= streams_per_worker:
            raise NoCapacity(
                f"no encoder capacity left for {device_id!r}: {workers} workers x "
                f"{streams_per_worker} streams are taken"
            )
        load[index] += 1
        out[device_id] = index
    return out

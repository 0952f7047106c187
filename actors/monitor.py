"""The leak monitor (the old service's goroutine monitor, Ray-native): the `monitor` actor.

Every `monitor.interval_s` one task on the actor's event loop samples
- live actors by class and object-store bytes in use on each node (from Ray's GCS and
  raylets, in a worker thread: those calls block),
- per watched actor, what its `resources()` answers (threads, asyncio tasks, fds,
  subprocesses, PeerConnections, ...).
The first sample at each load level (an actor's viewers, streams, frames in flight) is
that level's baseline. A value that grows more than `growth_percent` over the baseline of
the same load (and by at least a small absolute amount, so 1 -> 2 tasks is not a leak) is
logged as a structured warning (`leak suspected: {json}`) and sets the gauge
`cpm_leak_suspected{actor, resource}` to 1 until it falls back. `last_sample` is what
`/api/stats` shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from actors import metrics
from actors.aio import cancel_and_wait, every
from configs.schema import MonitorConfig

logger = logging.getLogger(__name__)

#: What an actor reports as its load, not as a resource: not judged, but each load level
#: gets its own baseline.
LOAD_KEYS = frozenset({"viewers", "peer_connections", "streams", "frames_in_flight"})


def _level(actor: str, load: tuple[tuple[str, int], ...]) -> str:
    return actor if not load else actor + "@" + ",".join(f"{k}={v}" for k, v in load)


#: Smallest growth that counts, per resource (noise floor): counts, and bytes.
MIN_GROWTH = {"object_store_bytes": 64 * 1024 * 1024}
DEFAULT_MIN_GROWTH = 3
SAMPLE_TIMEOUT_S = 5.0

Probe = Callable[[], Awaitable[dict[str, int]]]


class LeakMonitor:
    """Samples resources, keeps baselines, warns on growth."""

    def __init__(self, *, config: MonitorConfig, cluster: bool = True) -> None:
        self.config = config
        self.cluster = cluster
        self.probes: dict[str, Probe] = {}
        self.baseline: dict[str, dict[str, int]] = {}
        self.last: dict[str, Any] = {}
        self.suspects: dict[tuple[str, str], dict[str, Any]] = {}
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def watch(self, name: str, probe: Probe) -> None:
        self.probes[name] = probe

    def unwatch(self, name: str) -> None:
        self.probes.pop(name, None)
        for level in [k for k in self.baseline if k == name or k.startswith(name + "@")]:
            del self.baseline[level]
        for key in [k for k in self.suspects if k[0] == name]:
            del self.suspects[key]

    async def start(self) -> None:
        """Start sampling (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        await every(self.config.interval_s, self.sample_once, "leak monitor sample")

    async def sample_once(self) -> dict[str, Any]:
        """Take one sample, compare it with the baselines, return it."""
        values: dict[str, dict[str, int]] = {}
        try:
            await self.refresh()
        except Exception as exc:  # noqa: BLE001 - sample what is known
            logger.warning("leak monitor: refreshing the watched actors failed: %s", exc)
        if self.cluster:
            values["cluster"] = await asyncio.to_thread(_cluster_sample)
        names = list(self.probes)
        results = await asyncio.gather(
            *(asyncio.wait_for(self.probes[n](), SAMPLE_TIMEOUT_S) for n in names),
            return_exceptions=True,
        )
        unreachable = []
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                unreachable.append(name)
                logger.warning("leak monitor: %s did not answer: %s", name, result)
                continue
            values[name] = {k: int(v) for k, v in result.items()}
        self.samples += 1
        self._compare(values)
        self.last = {
            "time": time.time(),
            "samples": self.samples,
            "values": values,
            "baseline": self.baseline,
            "unreachable": unreachable,
            "suspects": list(self.suspects.values()),
        }
        return self.last

    def _compare(self, values: dict[str, dict[str, int]]) -> None:
        for actor, counts in values.items():
            load = tuple(sorted((k, v) for k, v in counts.items() if k in LOAD_KEYS))
            judged = {k: v for k, v in counts.items() if k not in LOAD_KEYS}
            # A baseline per load level: 10 viewers legitimately hold more tasks and fds
            # than none. A leak is growth at the same load (e.g. back at zero viewers).
            base = self.baseline.setdefault(_level(actor, load), dict(judged))
            for resource, value in judged.items():
                if resource not in base:
                    base[resource] = value
                    continue
                key = (actor, resource)
                floor = MIN_GROWTH.get(resource, DEFAULT_MIN_GROWTH)
                limit = base[resource] * (1 + self.config.growth_percent / 100)
                growing = value > limit and value - base[resource] >= floor
                if growing and key not in self.suspects:
                    record = {
                        "actor": actor,
                        "resource": resource,
                        "baseline": base[resource],
                        "value": value,
                        "load": dict(load),
                        "growth_percent": round(
                            100 * (value - base[resource]) / max(base[resource], 1), 1
                        ),
                    }
                    self.suspects[key] = record
                    logger.warning("leak suspected: %s", json.dumps(record, sort_keys=True))
                    metrics.set_gauge("leak_suspected", 1, actor=actor, resource=resource)
                elif growing:
                    self.suspects[key]["value"] = value
                elif key in self.suspects and _level(actor, load) == _level(
                    actor, tuple(sorted(self.suspects[key]["load"].items()))
                ):
                    del self.suspects[key]
                    logger.info("leak monitor: %s %s back to %d", actor, resource, value)
                    metrics.set_gauge("leak_suspected", 0, actor=actor, resource=resource)

    def last_sample(self) -> dict[str, Any]:
        return self.last

    async def refresh(self) -> None:
        """Update the watched set before a sample (actors come and go)."""


def _cluster_sample() -> dict[str, int]:
    """Live actors by class and object-store bytes in use, over the whole cluster."""
    import ray
    from ray._private import state
    from ray._private.internal_api import node_stats

    out: dict[str, int] = {}
    for actor in state.actors().values():
        if actor.get("State") == "ALIVE":
            key = f"actors.{actor.get('ActorClassName', '?')}"
            out[key] = out.get(key, 0) + 1
    used = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        try:
            reply = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"])
            used += int(reply.store_stats.object_store_bytes_used)
        except Exception as exc:  # noqa: BLE001 - a node going away is not an error here
            logger.debug("object store stats of %s unavailable: %s", node.get("NodeID"), exc)
    out["object_store_bytes"] = used
    return out


class MonitorActor(LeakMonitor):
    """The `monitor` actor: watches actors by handle (their `resources()` method)."""

    _pool: Any = None

    def watch_actor(self, name: str, handle: Any) -> None:
        self.watch(name, lambda: handle.resources.remote())

    def watch_pool(self, pool: Any) -> None:
        """Watch every encoder the pool runs, as they come and go."""
        self._pool = pool

    async def refresh(self) -> None:
        if self._pool is None:
            return
        handles = await asyncio.wait_for(self._pool.encoder_handles.remote(), SAMPLE_TIMEOUT_S)
        for name in [n for n in self.probes if n.startswith("encoder-") and n not in handles]:
            self.unwatch(name)
        for name, handle in handles.items():
            if name not in self.probes:
                self.watch_actor(name, handle)


def create_monitor_actor(config: MonitorConfig, *, scheduling_strategy: Any = None) -> Any:
    import ray

    options: dict[str, Any] = {"name": "monitor", "num_cpus": 0, "max_concurrency": 100}
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return ray.remote(MonitorActor).options(**options).remote(config=config)

"""The `ingress` actor: an async Ray actor whose event loop runs aiohttp and aiortc.

Ray gives an async actor one event loop of its own; the HTTP site, every PeerConnection
and every `push` from the encoders run on it, so the hubs need no locks. Handles of the
capture and encoder actors are kept only to ask them for stats and keyframes.
"""

from __future__ import annotations

from typing import Any

from actors.encoder import EncodedUnit
from configs.schema import DeviceConfig, IngressConfig
from ingress.server import IngressServer


class IngressActor:
    """Ray wrapper of IngressServer (methods are coroutines: an async actor)."""

    def __init__(self, *, config: IngressConfig) -> None:
        self.server = IngressServer(config=config)
        self.pool: Any = None

    async def start(self) -> int:
        return await self.server.start()

    async def attach_pool(self, pool: Any) -> None:
        """Keyframe requests and bitrate changes go to the pool, which knows the encoder."""
        self.pool = pool
        self.server.set_pool_stats(lambda: pool.stats.remote())
        for device_id, entry in self.server.devices.items():
            entry.hub.set_keyframe_requester(self._keyframe_requester(device_id))

    def _keyframe_requester(self, device_id: str) -> Any:
        return lambda: self.pool.request_keyframe.remote(device_id) if self.pool else None

    async def add_device(self, device: DeviceConfig, *, capture: Any) -> None:
        device_id = device.id
        self.server.add_device(
            device,
            request_keyframe=self._keyframe_requester(device_id),
            set_bitrate=lambda bps: (
                self.pool.set_bitrate.remote(device_id, bps) if self.pool else None
            ),
            capture_stats=lambda: capture.stats.remote(),
            input_sink=lambda event: capture.handle_input.remote(event),
            cache_gop=device.passthrough,
        )

    async def set_encoder(self, device_id: str, encoder: Any, info: dict[str, Any] | None) -> None:
        stats = (lambda: encoder.stats.remote()) if encoder is not None else None
        self.server.set_encoder(device_id, info, stats)

    async def device_status(self, device_id: str, status: str, reason: str | None) -> None:
        self.server.device_status(device_id, status, reason)

    async def set_ready(self, ready: bool = True) -> None:
        self.server.set_ready(ready)

    async def set_pool(self, capacity: int, streams: int, pending: int) -> None:
        self.server.pool_state(capacity=capacity, streams=streams, pending=pending)

    async def set_monitor(self, monitor: Any) -> None:
        self.server.set_monitor(lambda: monitor.last_sample.remote())

    async def push(self, unit: EncodedUnit) -> None:
        self.server.push(unit)

    async def stats(self) -> dict[str, Any]:
        return await self.server.stats()

    async def resources(self) -> dict[str, int]:
        return self.server.resources()

    async def stop(self) -> None:
        await self.server.stop()


def create_ingress_actor(config: IngressConfig, *, scheduling_strategy: Any = None) -> Any:
    """Start the `ingress` actor; call `start` on it to bind the HTTP port."""
    import ray

    options: dict[str, Any] = {"name": "ingress", "num_cpus": 0, "max_concurrency": 1000}
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return ray.remote(IngressActor).options(**options).remote(config=config)

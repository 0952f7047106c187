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

    async def start(self) -> int:
        return await self.server.start()

    async def add_device(
        self, device: DeviceConfig, *, capture: Any, encoder: Any, encoder_info: dict[str, Any]
    ) -> None:
        device_id = device.id
        self.server.add_device(
            device,
            request_keyframe=lambda: encoder.request_keyframe.remote(device_id),
            encoder=encoder_info,
            capture_stats=lambda: capture.stats.remote(),
        )

    async def add_encoder(self, name: str, encoder: Any) -> None:
        self.server.add_encoder(name, lambda: encoder.stats.remote())

    async def set_ready(self, ready: bool = True) -> None:
        self.server.set_ready(ready)

    async def set_pool(self, capacity: int, streams: int, pending: int) -> None:
        self.server.set_pool(capacity=capacity, streams=streams, pending=pending)

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


def create_ingress_actor(config: IngressConfig) -> Any:
    """Start the `ingress` actor; call `start` on it to bind the HTTP port."""
    import ray

    return (
        ray.remote(IngressActor)
        .options(name="ingress", num_cpus=0, max_concurrency=1000)
        .remote(config=config)
    )

"""The encoder pool: the `pool` actor that places streams on encoder actors.

One asyncio task on the actor's event loop runs the control loop; every method runs on
the same loop, so the pool's state needs no locks. The rules (DESIGN decisions 1, 4, 5,
7):

- **Affinity.** A stream stays on the encoder it is given until that encoder dies.
- **Capacity.** An encoder carries at most `pool.streams_per_worker` streams. Between
  `pool.min_workers` and the pool's maximum, encoders are started while streams wait;
  each asks Ray for `pool.resources` (GPU fractions, custom resources such as `nvenc`), so
  Ray's scheduler keeps NVENC session caps, and an encoder that cannot be placed stays
  pending in Ray, where the autoscaler sees the demand. A stream with no capacity is
  `pending` (in the API), never an exception.
- **Locality.** A new stream goes to an encoder on its capture actor's node; failing that,
  the pool starts one there (soft node affinity) if it may start one; only then does it
  use capacity on another node, and the capture actor counts the raw bytes that cross.
- **Failover.** A capture actor reports an encoder whose calls fail or hang; the pool
  pings it on the actor's control thread (frames do not hold the ping up), and if it
  does not answer within PING_TIMEOUT_S, or has spent STUCK_CALL_S in one encode call,
  it is killed and its streams are placed again at once, on capacity anywhere (an
  encoder start takes seconds; failover should not). The new encoder's first frame is
  an IDR with SPS/PPS; the ingress keeps the viewers' RTP timestamps rising.
- **Control.** `request_keyframe` and `set_bitrate` (clamped to the configured range)
  reach the stream's current encoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors.aio import cancel_and_wait, every
from actors.encoder import CONTROL_GROUP
from configs.schema import DeviceConfig, EncoderConfig, PoolConfig

logger = logging.getLogger(__name__)

TICK_S = 0.2
#: An encoder that does not answer a ping this fast (on its control thread, which frames
#: do not hold up) is gone: its node died or its process hangs.
PING_TIMEOUT_S = 0.4
#: An encoder that answers but has spent this long in one encode call is stuck.
STUCK_CALL_S = 2.0
#: How long a new stream waits for an encoder started on its own node before it takes
#: capacity on another node.
LOCAL_START_WAIT_S = 15.0


class PoolError(RuntimeError):
    """The pool cannot serve: its encoders cannot start (the message says why)."""


@dataclass
class EncoderSlot:
    """One encoder actor as the pool sees it."""

    index: int
    handle: Any
    ready_ref: Any
    state: str = "starting"  # starting | ready | dead
    info: dict[str, Any] = field(default_factory=dict)
    streams: set[str] = field(default_factory=set)
    wanted_node: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    error: str | None = None

    @property
    def name(self) -> str:
        return f"encoder-{self.index}"

    @property
    def node_id(self) -> str | None:
        return self.info.get("node_id")


@dataclass
class StreamSlot:
    """One stream (device) as the pool sees it."""

    device: DeviceConfig
    capture: Any
    capture_node: str
    bitrate_bps: int
    encoder: str | None = None
    pending_since: float = field(default_factory=time.monotonic)
    moves: int = 0
    waits_for_local: bool = True

    @property
    def status(self) -> str:
        return "assigned" if self.encoder else "pending"


CreateEncoder = Callable[[int, str | None], Any]


class EncoderPool:
    """Places streams on encoders and keeps them there."""

    def __init__(
        self,
        *,
        pool: PoolConfig,
        encoder: EncoderConfig,
        max_workers: int,
        ingress: Any,
        create_encoder: CreateEncoder | None = None,
    ) -> None:
        self.config = pool
        self.encoder_config = encoder
        self.max_workers = max(max_workers, pool.min_workers, 1)
        self.ingress = ingress
        self._create = create_encoder or self._create_encoder_actor
        self.encoders: dict[str, EncoderSlot] = {}
        self.streams: dict[str, StreamSlot] = {}
        self.failovers: list[dict[str, Any]] = []
        self._next_index = 0
        self._task: asyncio.Task[None] | None = None
        self._checking: set[str] = set()
        # Encoders that die soon after they start (a broken node, a bad driver) must not
        # be replaced in a tight loop: each such death doubles the wait, up to 30 s.
        self._next_start = 0.0
        self._start_backoff = 0.0

    # -- lifecycle --------------------------------------------------------------------

    def _create_encoder_actor(self, index: int, node_id: str | None) -> Any:
        from actors.encoder import create_encoder_actor

        strategy: Any = "SPREAD"
        if node_id is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # Soft, and spilling when that node is busy: the node is preferred, but an
            # encoder elsewhere beats none (its stream's raw frames then cross nodes).
            strategy = NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=True, _spill_on_unavailable=True
            )
        return create_encoder_actor(
            index,
            encoder=self.encoder_config,
            resources=self.config.resources,
            scheduling_strategy=strategy,
        )

    async def start(self, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Start `min_workers` encoders and wait for them; raise PoolError if none works."""
        for _ in range(self.config.min_workers):
            self._start_encoder(None)
        deadline = time.monotonic() + timeout
        while any(s.state == "starting" for s in self.encoders.values()):
            await self._poll_starting()
            if time.monotonic() > deadline:
                waiting = [s.name for s in self.encoders.values() if s.state == "starting"]
                logger.warning("encoders still waiting for Ray resources: %s", waiting)
                break
            await asyncio.sleep(0.05)
        dead = [s for s in self.encoders.values() if s.state == "dead"]
        if dead and len(dead) == len(self.encoders):
            raise PoolError(f"{dead[0].name} failed to start: {dead[0].error}")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return [s.info for s in self.encoders.values() if s.state == "ready"]

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        await every(TICK_S, self._tick, "pool control loop")

    async def _tick(self) -> None:
        await self._poll_starting()
        self._maintain()
        await self._place_pending()
        self._publish()

    # -- encoders ---------------------------------------------------------------------

    def _alive(self) -> list[EncoderSlot]:
        return [s for s in self.encoders.values() if s.state != "dead"]

    def _may_start(self) -> bool:
        """Below max_workers, and not inside the back-off after failing encoders."""
        return len(self._alive()) < self.max_workers and time.monotonic() >= self._next_start

    def _start_encoder(self, node_id: str | None) -> EncoderSlot:
        index = self._next_index
        self._next_index += 1
        handle = self._create(index, node_id)
        slot = EncoderSlot(index=index, handle=handle, ready_ref=handle.info.remote())
        slot.wanted_node = node_id
        self.encoders[slot.name] = slot
        logger.info("starting %s (near node %s)", slot.name, node_id or "any")
        return slot

    async def _poll_starting(self) -> None:
        import ray

        for slot in [s for s in self.encoders.values() if s.state == "starting"]:
            ready, _ = ray.wait([slot.ready_ref], timeout=0)
            if not ready:
                continue
            try:
                slot.info = await slot.ready_ref
                await slot.handle.set_ingress.remote(self.ingress)
            except Exception as exc:  # noqa: BLE001 - a failed start is reported, not raised
                slot.state = "dead"
                slot.error = _reason(exc)
                logger.error("%s failed to start: %s", slot.name, slot.error)
                continue
            slot.state = "ready"
            logger.info(
                "%s ready on %s (%s)", slot.name, slot.info.get("node"), slot.info.get("hwaccel")
            )

    def _maintain(self) -> None:
        """Keep min_workers encoders alive or starting (replace dead ones)."""
        failed_starts = [s for s in self.encoders.values() if s.state == "dead" and s.error]
        if failed_starts and not [s for s in self.encoders.values() if s.state == "ready"]:
            return  # encoders cannot start here at all: do not retry in a loop
        while len(self._alive()) < self.config.min_workers and self._may_start():
            self._start_encoder(None)

    # -- streams ----------------------------------------------------------------------

    async def add_stream(self, device: DeviceConfig, capture: Any) -> dict[str, Any]:
        """Take a new stream; place it now if capacity allows, else it waits (pending)."""
        capture_node = await capture.where.remote()
        await capture.set_pool.remote(self._self_handle())
        slot = StreamSlot(
            device=device,
            capture=capture,
            capture_node=capture_node,
            bitrate_bps=self.encoder_config.bitrate_bps,
        )
        self.streams[device.id] = slot
        await self._place(slot, failover=False)
        self._publish()
        return self.assignment(device.id)

    def _self_handle(self) -> Any:
        import ray

        return ray.get_runtime_context().current_actor

    def _free(self, slots: list[EncoderSlot]) -> list[EncoderSlot]:
        cap = self.config.streams_per_worker
        return sorted(
            (s for s in slots if s.state == "ready" and len(s.streams) < cap),
            key=lambda s: (len(s.streams), s.index),
        )

    async def _place(self, stream: StreamSlot, *, failover: bool) -> None:
        free = self._free(list(self.encoders.values()))
        local = [s for s in free if s.node_id == stream.capture_node]
        if local:
            await self._assign(stream, local[0])
            return
        if failover:
            # Capacity anywhere, now: a new encoder takes seconds to start.
            if free:
                await self._assign(stream, free[0])
                return
            if self._may_start():
                self._start_encoder(stream.capture_node)
            return
        starting_here = [
            s
            for s in self.encoders.values()
            if s.state == "starting" and s.wanted_node == stream.capture_node
        ]
        waited = time.monotonic() - stream.pending_since
        if stream.waits_for_local and waited < LOCAL_START_WAIT_S:
            if starting_here:
                return
            if self._may_start():
                self._start_encoder(stream.capture_node)
                return
        stream.waits_for_local = False
        if free:
            await self._assign(stream, free[0])
        elif self._may_start() and not [s for s in self.encoders.values() if s.state == "starting"]:
            self._start_encoder(None)

    async def _place_pending(self) -> None:
        for stream in list(self.streams.values()):
            if stream.encoder is None:
                await self._place(stream, failover=stream.moves > 0)

    async def _assign(self, stream: StreamSlot, slot: EncoderSlot) -> None:
        try:
            info = await asyncio.wait_for(
                slot.handle.open_stream.remote(stream.device, stream.bitrate_bps), 10
            )
        except Exception as exc:  # noqa: BLE001 - the encoder is checked, the stream waits
            logger.warning("%s could not open %s: %s", slot.name, stream.device.id, exc)
            await self._check(slot.name)
            return
        slot.streams.add(stream.device.id)
        stream.encoder = slot.name
        waited = time.monotonic() - stream.pending_since
        cross = slot.node_id != stream.capture_node
        logger.info(
            "%s -> %s on %s%s after %.3f s",
            stream.device.id,
            slot.name,
            info.get("node"),
            " (cross-node)" if cross else "",
            waited,
        )
        if stream.moves:
            self.failovers.append(
                {"device": stream.device.id, "encoder": slot.name, "seconds": round(waited, 3)}
            )
        await _tell(
            stream.capture.set_encoder_actor.remote(slot.handle, info),
            f"capture:{stream.device.id}",
        )
        await _tell(self.ingress.set_encoder.remote(stream.device.id, slot.handle, info), "ingress")

    def assignment(self, device_id: str) -> dict[str, Any]:
        stream = self.streams[device_id]
        slot = self.encoders.get(stream.encoder or "")
        return {
            "device": device_id,
            "status": stream.status,
            "encoder": stream.encoder,
            "node": slot.info.get("node") if slot else None,
            "node_id": slot.node_id if slot else None,
            "hwaccel": slot.info.get("hwaccel") if slot else None,
            "capture_node_id": stream.capture_node,
            "moves": stream.moves,
        }

    # -- failure ----------------------------------------------------------------------

    async def encoder_failed(self, device_id: str, name: str, reason: str) -> None:
        """A capture actor says `name` failed (`died`) or stopped answering."""
        logger.warning("%s reports %s %s", device_id, name, reason)
        await self._check(name, known_dead=(reason == "died"))

    async def _check(self, name: str, known_dead: bool = False) -> None:
        slot = self.encoders.get(name)
        if slot is None or slot.state == "dead" or name in self._checking:
            return
        self._checking.add(name)
        try:
            if not known_dead:
                ping = slot.handle.ping.options(concurrency_group=CONTROL_GROUP).remote()
                try:
                    answer = await asyncio.wait_for(ping, PING_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001
                    logger.warning("%s does not answer (%s): failing over", name, _reason(exc))
                else:
                    if answer["busy_s"] < STUCK_CALL_S:
                        return  # it answers and its frames move: slow, not dead
                    logger.warning(
                        "%s has been in one encode call for %.1f s: failing over",
                        name,
                        answer["busy_s"],
                    )
            await self._fail_over(slot)
        finally:
            self._checking.discard(name)

    async def _fail_over(self, slot: EncoderSlot) -> None:
        import ray

        lived = time.monotonic() - slot.started_at
        slot.state = "dead"
        slot.error = slot.error or "failed while running"
        if lived < 30:
            self._start_backoff = min(30.0, max(1.0, self._start_backoff * 2))
            self._next_start = time.monotonic() + self._start_backoff
        else:
            self._start_backoff = 0.0
        with contextlib.suppress(Exception):
            ray.kill(slot.handle, no_restart=True)
        moved = sorted(slot.streams)
        slot.streams.clear()
        for device_id in moved:
            stream = self.streams[device_id]
            stream.encoder = None
            stream.moves += 1
            stream.pending_since = time.monotonic()
            await _tell(stream.capture.set_encoder_actor.remote(None, None), f"capture:{device_id}")
            await _tell(self.ingress.set_encoder.remote(device_id, None, None), "ingress")
        for device_id in moved:
            await self._place(self.streams[device_id], failover=True)
        self._maintain()
        self._publish()

    # -- control ----------------------------------------------------------------------

    async def request_keyframe(self, device_id: str) -> bool:
        stream = self.streams.get(device_id)
        slot = self.encoders.get(stream.encoder or "") if stream else None
        if slot is None or slot.state != "ready":
            return False
        await slot.handle.request_keyframe.remote(device_id)
        return True

    async def set_bitrate(self, device_id: str, bps: int | None) -> int | None:
        """Clamp `bps` to the configured range and apply it to the stream's encoder;
        None returns the stream to the configured bitrate."""
        stream = self.streams.get(device_id)
        if stream is None:
            return None
        config = self.encoder_config
        stream.bitrate_bps = config.bitrate_bps if bps is None else config.clamp_bitrate(bps)
        slot = self.encoders.get(stream.encoder or "")
        if slot is not None and slot.state == "ready":
            await slot.handle.set_bitrate.remote(device_id, stream.bitrate_bps)
        return stream.bitrate_bps

    # -- state ------------------------------------------------------------------------

    def _publish(self) -> None:
        pending = sum(1 for s in self.streams.values() if s.encoder is None)
        capacity = self.config.streams_per_worker * len(
            [s for s in self.encoders.values() if s.state == "ready"]
        )
        self.ingress.set_pool.remote(capacity, len(self.streams) - pending, pending)

    def stats(self) -> dict[str, Any]:
        return {
            "min_workers": self.config.min_workers,
            "max_workers": self.max_workers,
            "streams_per_worker": self.config.streams_per_worker,
            "encoders": {
                name: {
                    "state": s.state,
                    "node": s.info.get("node"),
                    "node_id": s.node_id,
                    "hwaccel": s.info.get("hwaccel"),
                    "streams": sorted(s.streams),
                    "error": s.error,
                }
                for name, s in self.encoders.items()
            },
            "streams": {d: self.assignment(d) for d in self.streams},
            "pending": sorted(d for d, s in self.streams.items() if s.encoder is None),
            "failovers": self.failovers[-20:],
        }

    def encoder_handles(self) -> dict[str, Any]:
        return {n: s.handle for n, s in self.encoders.items() if s.state != "dead"}

    async def shutdown(self) -> None:
        """Stop the loop and kill every encoder this pool started."""
        import ray

        await self.stop()
        for slot in self.encoders.values():
            with contextlib.suppress(Exception):
                ray.kill(slot.handle, no_restart=True)


async def _tell(ref: Any, who: str) -> None:
    """Await a call whose failure must not stop the pool (the peer may be gone too)."""
    try:
        await asyncio.wait_for(ref, 10)
    except Exception as exc:  # noqa: BLE001
        logger.warning("telling %s failed: %s", who, _reason(exc))


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def create_pool_actor(
    *,
    pool: PoolConfig,
    encoder: EncoderConfig,
    max_workers: int,
    ingress: Any,
    scheduling_strategy: Any = None,
) -> Any:
    import ray

    options: dict[str, Any] = {"name": "pool", "num_cpus": 0, "max_concurrency": 1000}
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return (
        ray.remote(EncoderPool)
        .options(**options)
        .remote(pool=pool, encoder=encoder, max_workers=max_workers, ingress=ingress)
    )

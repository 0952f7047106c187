"""Capture: one `CaptureWorker` per device, behind a `capture:<device>` actor.

The worker runs one asyncio task (on the actor's event loop) that paces the source on
`time.monotonic()`, puts each frame into Ray's object store once and hands the ref to its
stream's encoder. Back-pressure (DESIGN decision 2): at most `max_in_flight` frames wait
on the encoder; a frame that finds no room is dropped before it is put and counted under
`backpressure`. Nothing is dropped without a count: `dropped` holds every reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from actors import metrics
from actors.aio import cancel_and_wait
from actors.input import InputError, SwipeEvent, TapEvent, adb_input_args, parse_event
from actors.sources import Captured, EncodedFrame, SourceOffline, SyntheticFeed, make_feed
from actors.stats import node_id, process_resources
from configs.schema import AdbScreencapSource, AdbScreenrecordSource, DeviceConfig

logger = logging.getLogger(__name__)

#: Hands one frame to the encoder; the awaitable completes when it has been encoded.
Submit = Callable[[Any], Awaitable[Any]]

#: Most units of a transcoded device's GOP kept to prime a new encoder.
GOP_MAX = 600
#: Frames waiting this long on a full in-flight window make the encoder a suspect.
STUCK_AFTER_S = 0.25
#: One report per encoder per this many seconds.
REPORT_EVERY_S = 1.0
#: Back-off between attempts to reach an offline device, doubling up to this.
MAX_BACKOFF_S = 30.0


def _is_actor_death(exc: BaseException) -> bool:
    try:
        import ray

        return isinstance(exc, ray.exceptions.RayActorError)
    except ImportError:
        return False


class CaptureWorker:
    """Paces one device's source and feeds its encoder."""

    def __init__(self, *, device: DeviceConfig, max_in_flight: int = 2) -> None:
        self.device = device
        self.max_in_flight = max_in_flight
        self.feed = make_feed(device)
        self._forward: Callable[[EncodedFrame], Any] | None = None
        self._status = "idle"
        self.offline_reason: str | None = None
        self._status_sink: Callable[[str, str | None], Any] | None = None
        self.restarts = 0
        self.transcode_backlog = 0
        self._late_seen = 0
        self.frames_captured = 0
        self.frames_sent = 0
        self.frames_encoded = 0
        self.dropped: dict[str, int] = {}
        self._in_flight = 0
        self._in_flight_since: dict[int, float] = {}
        self._generation = 0
        self._submit: Submit | None = None
        self.encoder_name: str | None = None
        self.raw_bytes_cross_node = 0
        self._reported: dict[str, float] = {}
        self.inputs: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._captured_at: deque[float] = deque(maxlen=4 * device.fps)
        self.gop: list[bytes] = []
        """Transcode: the device's units since its last IDR, to prime a new encoder."""

    @property
    def status(self) -> str:
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        changed = value != self._status
        self._status = value
        if changed and self._status_sink is not None:
            try:
                self._status_sink(value, self.offline_reason)
            except Exception:
                logger.exception("reporting the status of %s failed", self.device.id)

    def set_status_sink(self, sink: Callable[[str, str | None], Any] | None) -> None:
        """Told of every status change (idle, starting, live, offline, stopped)."""
        self._status_sink = sink

    def set_encoder(self, submit: Submit | None, name: str | None = None) -> None:
        """Point the stream at an encoder (None: frames are dropped as `no_encoder`).

        Frames still in flight to a previous encoder no longer hold back-pressure slots:
        that encoder may be gone, and its answers may never come.
        """
        self._submit = submit
        self.encoder_name = name
        self._generation += 1
        self._in_flight = 0
        self._in_flight_since.clear()

    def encoder_failed(self, name: str, reason: str) -> None:
        """The encoder `name` failed or stopped answering (the pool's concern)."""

    async def start(self, phase: float = 0.0) -> None:
        """Start capturing (idempotent).

        `phase` (0..1) delays the first frame by that fraction of a frame interval: the
        driver spreads the devices sharing an encoder over the interval so their frames
        do not all reach it at the same instant.
        """
        if self._task is None or self._task.done():
            self.status = "starting"
            if isinstance(self.feed, SyntheticFeed):
                self.feed.phase = phase
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop capturing and wait for frames in flight (bounded; idempotent)."""
        self.status = "stopped"
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._pending:
            await asyncio.wait(self._pending, timeout=2.0)
        await self.feed.close()

    def _drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        metrics.inc("frames_dropped", count, device=self.device.id, stage="capture", reason=reason)

    async def _run(self) -> None:
        """Run the feed; when it ends (screenrecord's limit) start it again at once; when
        the device is offline retry with exponential back-off, capped at 30 s."""
        backoff = 0.0
        while True:
            try:
                async for item in self.feed.frames():
                    if self.status != "live":
                        self.offline_reason, backoff = None, 0.0
                        self.status = "live"
                    try:
                        self._capture(item)
                    except Exception:
                        logger.exception("capture of %s failed; continuing", self.device.id)
                        self._drop("capture_error")
                self.restarts += 1
                logger.info("%s: source ended; restarting it", self.device.id)
                continue
            except SourceOffline as exc:
                reason = str(exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a source bug must not end capture
                logger.exception("source of %s failed", self.device.id)
                reason = f"{type(exc).__name__}: {exc}"
            backoff = min(MAX_BACKOFF_S, max(1.0, backoff * 2))
            if self.status != "offline" or reason != self.offline_reason:
                logger.warning(
                    "%s offline (%s); retrying in %.0f s", self.device.id, reason, backoff
                )
            self.offline_reason = reason
            self.status = "offline"
            await asyncio.sleep(backoff)

    def _capture(self, item: Captured) -> None:
        self.frames_captured += 1
        self._captured_at.append(time.monotonic())
        metrics.inc("frames_captured", device=self.device.id)
        late = getattr(self.feed, "late_frames", 0)
        if late > self._late_seen:
            # The loop fell behind by whole frame intervals: those frames were never
            # captured. Count them so a starved capture actor is visible.
            self._drop("capture_late", late - self._late_seen)
            self._late_seen = late
        if isinstance(item, EncodedFrame) and self.device.passthrough:
            # The device's H.264 goes to the viewers as is: it is never dropped here
            # (a missing unit would break decoding until the next IDR).
            if self._forward is None:
                self._drop("no_ingress")
                return
            self.frames_sent += 1
            self._forward(item)
            return
        if isinstance(item, EncodedFrame):
            self._remember(item)
        if self._submit is None:
            self._drop("no_encoder")
            return
        now = time.monotonic()
        if self._in_flight >= self.max_in_flight:
            if isinstance(item, EncodedFrame):
                # Transcoding needs every unit (a skipped one breaks the decoder until
                # the next IDR): it goes anyway, and the backlog is counted, not dropped.
                self.transcode_backlog += 1
            else:
                self._drop("backpressure")
                oldest = min(self._in_flight_since.values(), default=now)
                if now - oldest > STUCK_AFTER_S:
                    self._report(self.encoder_name, "unresponsive")
                return
        self._in_flight += 1
        self.frames_sent += 1
        token = self.frames_sent
        self._in_flight_since[token] = now
        result = self._submit(item)
        task = asyncio.get_running_loop().create_task(
            self._await_encoded(result, token, self._generation, self.encoder_name)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _remember(self, item: EncodedFrame) -> None:
        """Keep the current GOP of a transcoded device: an encoder that takes the stream
        over mid-GOP decodes it first (`prime`), instead of failing on every unit until
        the device's next IDR, which may be seconds away."""
        if item.keyframe:
            self.gop = [item.data]
        elif self.gop and len(self.gop) < GOP_MAX:
            self.gop.append(item.data)
        else:
            self.gop = []  # too long to replay: the next IDR starts a new one

    def _report(self, name: str | None, reason: str) -> None:
        if name is None or self.status == "stopped":
            return
        now = time.monotonic()
        if now - self._reported.get(name, 0.0) < REPORT_EVERY_S:
            return
        self._reported[name] = now
        logger.warning("%s: encoder %s %s", self.device.id, name, reason)
        try:
            self.encoder_failed(name, reason)
        except Exception:
            logger.exception("reporting the failure of %s failed", name)

    async def _await_encoded(
        self, result: Awaitable[Any], token: int, generation: int, name: str | None
    ) -> None:
        try:
            await result
            self.frames_encoded += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - an encoder failure must not stop capture
            lost = _is_actor_death(exc)
            self._drop("encoder_lost" if lost else "encoder_error")
            if lost:
                self._report(name, "died")
            else:
                logger.warning("encoding a frame of %s failed: %s", self.device.id, exc)
        finally:
            if generation == self._generation:
                self._in_flight -= 1
                self._in_flight_since.pop(token, None)

    def fps(self) -> float:
        """Frames captured per second over the last few seconds."""
        stamps = self._captured_at
        if len(stamps) < 2 or time.monotonic() - stamps[-1] > 1.0:
            return 0.0
        return round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 2)

    def handle_input(self, event: dict[str, Any]) -> bool:
        """Apply a viewer's input event (validated again: it crossed an actor boundary)."""
        try:
            parsed = parse_event(json.dumps(event))
        except InputError as exc:
            logger.warning("%s: input refused: %s", self.device.id, exc)
            return False
        self.inputs[parsed.type] = self.inputs.get(parsed.type, 0) + 1
        if isinstance(self.feed, SyntheticFeed):
            if isinstance(parsed, TapEvent):
                self.feed.tap(parsed.x, parsed.y)
            elif isinstance(parsed, SwipeEvent):
                self.feed.tap(parsed.x2, parsed.y2)  # where the finger lifts
            return True
        source = self.device.source
        if isinstance(source, AdbScreenrecordSource | AdbScreencapSource):
            args = adb_input_args(parsed, width=self.device.width, height=self.device.height)
            task = asyncio.get_running_loop().create_task(self._adb_input(args))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            return True
        self.inputs["unsupported"] = self.inputs.get("unsupported", 0) + 1
        return False

    async def _adb_input(self, args: list[str]) -> None:
        adb = getattr(self.feed, "adb", None)
        if adb is None:
            return
        try:
            await adb.run("shell", *args)
        except SourceOffline as exc:
            logger.warning("%s: input failed: %s", self.device.id, exc)
            self.inputs["failed"] = self.inputs.get("failed", 0) + 1

    def resources(self) -> dict[str, int]:
        adb = getattr(self.feed, "adb", None)
        return {
            **process_resources(),
            "frames_in_flight": self._in_flight,
            "adb_children": len(adb.children) if adb is not None else 0,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.device.id,
            "source": self.device.source.kind,
            "status": self.status,
            "offline_reason": self.offline_reason,
            "restarts": self.restarts,
            "restart_gaps_ms": [round(g, 1) for g in getattr(self.feed, "restart_gaps_ms", [])],
            "unchanged_skipped": getattr(self.feed, "unchanged", 0),
            "transcode_backlog": self.transcode_backlog,
            "loops": getattr(self.feed, "loops", 0),
            "frames_captured": self.frames_captured,
            "frames_sent": self.frames_sent,
            "frames_encoded": self.frames_encoded,
            "in_flight": self._in_flight,
            "encoder": self.encoder_name,
            "raw_bytes_cross_node": self.raw_bytes_cross_node,
            "inputs": dict(self.inputs),
            "dropped": dict(self.dropped),
            "fps": self.fps(),
        }


class CaptureActor(CaptureWorker):
    """The `capture:<device>` actor: a CaptureWorker that feeds an encoder actor."""

    def __init__(self, *, device: DeviceConfig, max_in_flight: int = 2) -> None:
        super().__init__(device=device, max_in_flight=max_in_flight)
        self._pool: Any = None
        self.node_id = node_id()

    def where(self) -> str:
        """The Ray node id this capture runs on (the pool places encoders near it)."""
        return self.node_id

    def set_pool(self, pool: Any) -> None:
        self._pool = pool

    def report_status_to(self, ingress: Any) -> None:
        device_id = self.device.id
        self.set_status_sink(
            lambda status, reason: ingress.device_status.remote(device_id, status, reason)
        )
        self._status_sink(self.status, self.offline_reason)  # type: ignore[misc]

    def set_ingress(self, ingress: Any) -> None:
        """Passthrough: access units go straight to the ingress, in capture order."""
        from actors.encoder import EncodedUnit

        device_id = self.device.id

        def forward(item: EncodedFrame) -> None:
            ingress.push.remote(
                EncodedUnit(
                    device_id=device_id,
                    seq=item.index,
                    data=item.data,
                    keyframe=item.keyframe,
                    capture_ms=item.capture_ms,
                    encode_ms=0.0,
                    encoded_ms=item.capture_ms,
                )
            )

        self._forward = forward

    def encoder_failed(self, name: str, reason: str) -> None:
        if self._pool is not None:
            self._pool.encoder_failed.remote(self.device.id, name, reason)

    def set_encoder_actor(self, encoder: Any, info: dict[str, Any] | None = None) -> None:
        """Send frames to `encoder` (an EncoderActor handle) as object refs; None: pending."""
        import ray

        if encoder is None:
            self.set_encoder(None)
            return
        info = info or {}
        device_id = self.device.id
        remote = info.get("node_id") not in (None, self.node_id)

        def submit(item: Captured) -> Any:
            if isinstance(item, EncodedFrame):  # transcode: small, goes inline
                if remote:
                    self.raw_bytes_cross_node += len(item.data)
                return encoder.encode_packet.remote(
                    device_id, item.data, item.index, item.capture_ms
                )
            # Put once; the encoder reads it zero-copy on this node and the ref is
            # released as soon as the encode task ends (DESIGN decision 3).
            ref = ray.put(item.data)
            if remote:
                self.raw_bytes_cross_node += item.data.nbytes
            return encoder.encode.remote(device_id, ref, item.index, item.capture_ms, item.pix_fmt)

        if self.gop:
            # Before the next unit (calls from here run in order on the encoder).
            encoder.prime.remote(device_id, list(self.gop))
            if remote:
                self.raw_bytes_cross_node += sum(map(len, self.gop))
        self.set_encoder(submit, info.get("name"))


def create_capture_actor(
    device: DeviceConfig, *, max_in_flight: int, scheduling_strategy: Any = None
) -> Any:
    """Start the `capture:<device>` actor (not yet capturing: call `start`).

    It asks for `device.capture_resources` (to land on the node that reaches the device);
    without them it follows `scheduling_strategy` (the driver pins it to its own node).
    """
    import ray

    # The capture loop is light (one memcpy and one put per frame); the CPU request sits
    # with the encoders, so captures never wait for a CPU slot.
    options: dict[str, Any] = {
        "name": f"capture:{device.id}",
        "num_cpus": 0,
        "max_concurrency": 64,
    }
    if device.capture_resources:
        options["resources"] = dict(device.capture_resources)
    elif scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return (
        ray.remote(CaptureActor)
        .options(**options)
        .remote(device=device, max_in_flight=max_in_flight)
    )

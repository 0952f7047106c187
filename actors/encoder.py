"""Stream encoders and the encoder actor.

`StreamEncoder` holds one stream's stateful H.264 encoder (DESIGN decision 1: a stream is
bound to one encoder for its life). `EncoderWorker` is the plain class behind each encoder
actor: it carries several streams, runs on one thread (Ray's default for a sync actor, so
the frames of one stream are encoded in the order their capture actor sent them), and
hands every access unit to a sink, which in the pipeline is the ingress actor's `push`.

Timestamps: the access unit keeps the capture wall-clock time of its frame; the ingress
derives RTP time from it and keeps it monotonic.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import av
import numpy as np
from av.video.codeccontext import VideoCodecContext

from actors import metrics
from actors.hwaccel import Detection, detect, open_context
from actors.stats import node_address, node_id, percentile, process_resources
from configs.schema import ActorResources, DeviceConfig, EncoderConfig

logger = logging.getLogger(__name__)

#: A frame not started within this many ms of its capture is dropped as stale.
STALE_AFTER_MS = 200
#: Handing an access unit to the ingress has this budget (the old service's deadline).
PUSH_BUDGET_MS = 100
#: Units that may wait unacknowledged on the ingress before it counts as unavailable.
MAX_PENDING_PUSHES = 60
#: Acknowledgements are checked once this many pushes are outstanding.
REAP_PUSHES_AT = 16
#: At most one encoder reopen for a bitrate change per this many seconds (each costs an
#: IDR); libx264 changes under its VBV ceiling are made in place, without one.
BITRATE_MIN_INTERVAL_S = 1.0
#: The encoder actor's concurrency group for the pool's pings.
CONTROL_GROUP = "control"
#: libx264 follows a target this many times under its VBV ceiling in place (no IDR).
IN_PLACE_BAND = 2.0


@dataclass(frozen=True)
class EncodedUnit:
    """One H.264 access unit (Annex-B), as the encoder hands it to the ingress."""

    device_id: str
    """The device (stream) it belongs to."""
    seq: int
    """Frame index at the source; rises by at least one per unit."""
    data: bytes
    """Annex-B access unit; a keyframe carries SPS and PPS before its IDR slice."""
    keyframe: bool
    """True for an IDR access unit."""
    capture_ms: float
    """Capture wall-clock time of the frame, ms."""
    encode_ms: float
    """Time spent encoding it, ms."""
    encoded_ms: float
    """Wall-clock time when the encoder finished it, ms."""
    encoder: str = ""
    """The encoder that made it (the ingress takes units only from the current one)."""


@dataclass
class StreamStats:
    """Counters of one stream on its encoder."""

    frames_in: int = 0
    frames_encoded: int = 0
    bytes_out: int = 0
    keyframes: int = 0
    bitrate_changes: int = 0
    bitrate_reopens: int = 0
    """Bitrate changes that needed a new encoder (and so an IDR)."""
    primed: int = 0
    """Transcode: device units decoded, not encoded, to take the stream over mid-GOP."""
    dropped: dict[str, int] = field(default_factory=dict)
    encode_ms: deque[float] = field(default_factory=lambda: deque(maxlen=300))

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class StreamEncoder:
    """One stream's encoder: raw yuv420p frames in, Annex-B access units out."""

    def __init__(
        self,
        device: DeviceConfig,
        config: EncoderConfig,
        backend: str,
        bitrate_bps: int | None = None,
    ) -> None:
        self.device = device
        self.config = config
        self.backend = backend
        self.stats = StreamStats()
        self._keyframe_requested = False
        self.bitrate_bps = config.clamp_bitrate(bitrate_bps or config.bitrate_bps)
        self.ceiling_bps = self.bitrate_bps
        """The rate libx264's VBV was opened for: the most the stream may peak at."""
        self._ctx = self._open(self.bitrate_bps)
        self._pending_bitrate: int | None = None
        self._reconfigured_at = 0.0
        self._decoder: Any = None
        self._last_pts = -1

    def _open(self, bitrate_bps: int) -> VideoCodecContext:
        config = self.config.model_copy(update={"bitrate_bps": bitrate_bps})
        device = self.device
        return open_context(
            self.backend,
            config,
            width=device.width,
            height=device.height,
            fps=device.fps,
            ceiling_bps=self.ceiling_bps,
        )

    def set_bitrate(self, bps: int) -> int:
        """Ask for a new target bitrate (clamped to the configured range); return it.

        libx264 changes in place, at the next frame and without an IDR, while the target
        stays within IN_PLACE_BAND of the rate its VBV was opened for (`ceiling_bps`):
        x264's rate control follows the new average, and the VBV ceiling bounds the peaks.
        Further away, and for the hardware backends, the change opens a new encoder at the
        next frame (SPS/PPS and an IDR), at most once per BITRATE_MIN_INTERVAL_S: lowered,
        its ceiling is the target, so the VBV enforces it; raised, the ceiling has room for
        the estimate to keep rising in place. Changes under 10 % are ignored.
        """
        target = self.config.clamp_bitrate(bps)
        if abs(target - self.bitrate_bps) < 0.1 * self.bitrate_bps:
            self._pending_bitrate = None
        elif self.backend == "libx264" and self.ceiling_bps / IN_PLACE_BAND <= target <= (
            self.ceiling_bps
        ):
            self._pending_bitrate = None
            self._ctx.bit_rate = target  # FFmpeg reconfigures x264 at the next frame
            self.bitrate_bps = target
            self.stats.bitrate_changes += 1
            logger.info("%s: bitrate now %d bps (in place)", self.device.id, target)
        else:
            self._pending_bitrate = target
        return target

    def _apply_bitrate(self) -> None:
        target = self._pending_bitrate
        if target is None or time.monotonic() - self._reconfigured_at < BITRATE_MIN_INTERVAL_S:
            return
        self._pending_bitrate = None
        raised = target > self.bitrate_bps
        self.ceiling_bps = (
            min(self.config.max_bitrate_bps, int(target * IN_PLACE_BAND)) if raised else target
        )
        old, self._ctx = self._ctx, self._open(target)
        self._reconfigured_at = time.monotonic()
        self.bitrate_bps = target
        self.stats.bitrate_changes += 1
        self.stats.bitrate_reopens += 1
        try:
            old.encode(None)
        except av.FFmpegError:
            logger.debug("flushing the replaced encoder failed", exc_info=True)
        logger.info("%s: bitrate now %d bps (new encoder, IDR)", self.device.id, target)

    def request_keyframe(self) -> None:
        """The next frame becomes an IDR (with SPS/PPS in front)."""
        self._keyframe_requested = True

    def encode(
        self, data: np.ndarray, capture_ms: float, pix_fmt: str = "yuv420p"
    ) -> list[tuple[bytes, bool, float]]:
        """Encode one frame; return its access units as (bytes, keyframe, encode ms).

        Packed RGB from screencap is converted here, on the encoder's core.
        """
        start = time.perf_counter()
        if pix_fmt == "rgb565le":
            data, pix_fmt = rgb565_to_rgb24(data), "rgb24"
        frame = av.VideoFrame.from_ndarray(data, format=pix_fmt)
        return self.encode_frame(frame, capture_ms, start)

    def prime(self, units: list[bytes]) -> int:
        """Decode a device's units since its last IDR without encoding them: taking the
        stream over mid-GOP, the next unit then decodes. Returns the frames decoded."""
        self.stats.primed += len(units)
        return sum(len(self._decode(data)) for data in units)

    def encode_packet(self, data: bytes, capture_ms: float) -> list[tuple[bytes, bool, float]]:
        """Transcode one H.264 access unit from a device: decode, scale, encode."""
        start = time.perf_counter()
        out: list[tuple[bytes, bool, float]] = []
        for frame in self._decode(data):
            out += self.encode_frame(frame, capture_ms, start)
        return out

    def _decode(self, data: bytes) -> list[av.VideoFrame]:
        """Decode one of the device's access units (an error is counted, not raised)."""
        if self._decoder is None:
            self._decoder = av.CodecContext.create("h264", "r")
        try:
            return cast(list[av.VideoFrame], self._decoder.decode(av.Packet(data)))
        except av.FFmpegError as exc:
            self.stats.drop("decode_error")
            logger.warning("%s: decoding the device's H.264 failed: %s", self.device.id, exc)
            return []

    def encode_frame(
        self, frame: av.VideoFrame, capture_ms: float, start: float
    ) -> list[tuple[bytes, bool, float]]:
        self._apply_bitrate()
        d = self.device
        if frame.format.name != self._ctx.pix_fmt or (frame.width, frame.height) != (
            d.width,
            d.height,
        ):
            frame = frame.reformat(width=d.width, height=d.height, format=self._ctx.pix_fmt)
        # 90 kHz from the capture clock; strictly rising, as the encoder requires.
        pts = max(int(capture_ms * 90), self._last_pts + 1)
        self._last_pts = pts
        frame.pts = pts
        if self._keyframe_requested:
            frame.pict_type = av.video.frame.PictureType.I
            self._keyframe_requested = False
        else:
            # A decoded (transcoded) frame keeps its source's picture type; the GOP here
            # is this encoder's own.
            frame.pict_type = av.video.frame.PictureType.NONE
        packets = self._ctx.encode(frame)
        elapsed = (time.perf_counter() - start) * 1000
        self.stats.frames_in += 1
        self.stats.encode_ms.append(elapsed)
        out = []
        for packet in packets:
            payload = bytes(packet)
            out.append((payload, bool(packet.is_keyframe), elapsed))
            self.stats.frames_encoded += 1
            self.stats.bytes_out += len(payload)
            self.stats.keyframes += int(packet.is_keyframe)
        return out

    def close(self) -> None:
        try:
            self._ctx.encode(None)
        except av.FFmpegError:
            logger.debug("flushing the encoder of %s failed", self.device.id, exc_info=True)


def rgb565_to_rgb24(data: np.ndarray) -> np.ndarray:
    """RGB 5-6-5 (H x W uint16) to packed RGB 8-8-8, with the high bits repeated."""
    v = data.astype(np.uint16)
    r = ((v >> 11) & 0x1F).astype(np.uint8)
    g = ((v >> 5) & 0x3F).astype(np.uint8)
    b = (v & 0x1F).astype(np.uint8)
    return np.stack(((r << 3) | (r >> 2), (g << 2) | (g >> 4), (b << 3) | (b >> 2)), axis=-1)


Sink = Callable[[EncodedUnit], Any]


class EncoderWorker:
    """The plain class behind an encoder actor: several streams, one thread."""

    def __init__(self, *, name: str, encoder: EncoderConfig, sink: Sink | None = None) -> None:
        self.name = name
        self.config = encoder
        self.detection: Detection = detect(encoder)
        self._sink = sink
        self._streams: dict[str, StreamEncoder] = {}
        self.node = node_address()
        self.node_id = node_id()
        self._busy_since: float | None = None

    def set_sink(self, sink: Sink) -> None:
        self._sink = sink

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "node": self.node,
            "node_id": self.node_id,
            "hwaccel": self.detection.backend,
            "codec": self.detection.codec_name,
            "streams": sorted(self._streams),
        }

    def open_stream(self, device: DeviceConfig, bitrate_bps: int | None = None) -> dict[str, Any]:
        """Bind `device`'s stream to this worker (idempotent); its first frame is an IDR."""
        if device.id not in self._streams:
            self._streams[device.id] = StreamEncoder(
                device, self.config, self.detection.backend, bitrate_bps
            )
            logger.info(
                "%s: stream %s opened (%s)", self.name, device.id, self.detection.codec_name
            )
        return self.info()

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """Marks the encoding thread as inside one call (what `ping` reports)."""
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None

    def ping(self) -> dict[str, Any]:
        """Liveness check of the pool. The actor answers it on its own `control` thread,
        not behind the frames queued for the encoding thread: a slow encoder is not a dead
        one. `busy_s` is how long the encoding thread has been inside its current call."""
        since = self._busy_since
        return {"name": self.name, "busy_s": 0.0 if since is None else time.monotonic() - since}

    def set_bitrate(self, device_id: str, bps: int) -> int | None:
        """Set a stream's target bitrate (clamped); return the value applied, or None."""
        stream = self._streams.get(device_id)
        return None if stream is None else stream.set_bitrate(bps)

    def close_stream(self, device_id: str) -> None:
        stream = self._streams.pop(device_id, None)
        if stream is not None:
            stream.close()

    def request_keyframe(self, device_id: str) -> bool:
        stream = self._streams.get(device_id)
        if stream is None:
            return False
        stream.request_keyframe()
        return True

    def encode(
        self,
        device_id: str,
        data: np.ndarray,
        index: int,
        capture_ms: float,
        pix_fmt: str = "yuv420p",
    ) -> int:
        """Encode frame `index` of `device_id`; return the number of access units sent.

        A frame that waited more than STALE_AFTER_MS since capture is dropped (counted).
        """
        stream = self._stream(device_id, capture_ms)
        if stream is None:
            return 0
        with self._busy():
            units = stream.encode(data, capture_ms, pix_fmt)
        return self._send(stream, device_id, index, capture_ms, units)

    def prime(self, device_id: str, units: list[bytes]) -> int:
        """Transcode: decode `device_id`'s units since its last IDR (see StreamEncoder)."""
        stream = self._streams.get(device_id)
        if stream is None:
            raise KeyError(f"stream {device_id!r} is not open on {self.name}")
        with self._busy():
            return stream.prime(units)

    def encode_packet(self, device_id: str, data: bytes, index: int, capture_ms: float) -> int:
        """Transcode access unit `index` of a device's own H.264 (never dropped as stale:
        a skipped unit would break the decoder until the next IDR)."""
        stream = self._streams.get(device_id)
        if stream is None:
            raise KeyError(f"stream {device_id!r} is not open on {self.name}")
        with self._busy():
            units = stream.encode_packet(data, capture_ms)
        return self._send(stream, device_id, index, capture_ms, units)

    def _stream(self, device_id: str, capture_ms: float) -> StreamEncoder | None:
        stream = self._streams.get(device_id)
        if stream is None:
            raise KeyError(f"stream {device_id!r} is not open on {self.name}")
        if time.time() * 1000 - capture_ms > STALE_AFTER_MS:
            stream.stats.drop("stale")
            metrics.inc("frames_dropped", device=device_id, stage="encoder", reason="stale")
            return None
        return stream

    def _send(
        self,
        stream: StreamEncoder,
        device_id: str,
        index: int,
        capture_ms: float,
        units: list[tuple[bytes, bool, float]],
    ) -> int:
        backend = self.detection.backend
        now = time.time() * 1000
        for payload, keyframe, encode_ms in units:
            metrics.inc("frames_encoded", device=device_id, encoder=self.name, hwaccel=backend)
            metrics.observe("encode_latency_ms", encode_ms, device=device_id, hwaccel=backend)
            if self._sink is None:
                continue
            self._sink(
                EncodedUnit(
                    device_id=device_id,
                    seq=index,
                    data=payload,
                    keyframe=keyframe,
                    capture_ms=capture_ms,
                    encode_ms=encode_ms,
                    encoded_ms=now,
                    encoder=self.name,
                )
            )
        return len(units) if self._sink is not None else 0

    def resources(self) -> dict[str, int]:
        return {**process_resources(), "streams": len(self._streams)}

    def stats(self) -> dict[str, Any]:
        streams = {}
        for device_id, stream in self._streams.items():
            s = stream.stats
            times = sorted(s.encode_ms)
            streams[device_id] = {
                "bitrate_bps": stream.bitrate_bps,
                "bitrate_changes": s.bitrate_changes,
                "bitrate_reopens": s.bitrate_reopens,
                "primed": s.primed,
                "frames_in": s.frames_in,
                "frames_encoded": s.frames_encoded,
                "keyframes": s.keyframes,
                "bytes_out": s.bytes_out,
                "dropped": dict(s.dropped),
                "encode_ms_p50": percentile(times, 50),
                "encode_ms_p99": percentile(times, 99),
            }
        return {**self.info(), "streams": streams}

    def stop(self) -> None:
        for device_id in list(self._streams):
            self.close_stream(device_id)


class EncoderActor(EncoderWorker):
    """The `encoder-<n>` actor: an EncoderWorker whose sink is the ingress actor."""

    def set_ingress(self, ingress: Any) -> None:
        self._ingress = ingress
        self._pushes: deque[Any] = deque()
        self.set_sink(self._push)

    def _push(self, unit: EncodedUnit) -> None:
        # Fire and forget: submission order from this one thread is the order the ingress
        # receives them in. Acknowledgements are reaped here; if the ingress has left a
        # whole queue of units unacknowledged it is gone or stuck, and more units would
        # only pile up in this process: drop them (counted) and resume on an IDR.
        import ray

        if len(self._pushes) >= REAP_PUSHES_AT:  # amortised: ray.wait is not free
            ready, _ = ray.wait(list(self._pushes), num_returns=len(self._pushes), timeout=0)
            done = set(ready)
            self._pushes = deque(r for r in self._pushes if r not in done)
        stream = self._streams.get(unit.device_id)
        if len(self._pushes) >= MAX_PENDING_PUSHES:
            if stream is not None:
                stream.stats.drop("ingress_unavailable")
                stream.request_keyframe()
            metrics.inc(
                "frames_dropped",
                device=unit.device_id,
                stage="encoder",
                reason="ingress_unavailable",
            )
            return
        self._pushes.append(self._ingress.push.remote(unit))


def create_encoder_actor(
    index: int,
    *,
    encoder: EncoderConfig,
    resources: ActorResources,
    scheduling_strategy: Any = None,
) -> Any:
    """Start the `encoder-<index>` actor with the Ray resources the config asks for."""
    import ray

    options: dict[str, Any] = {
        "name": f"encoder-{index}",
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "resources": dict(resources.custom),
    }
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    # Frames are encoded one at a time on the default thread; `control` answers pings
    # beside it (see EncoderWorker.ping).
    # (Ray takes concurrency_groups in ray.remote only; its stubs do not list it.)
    actor = ray.remote(concurrency_groups={CONTROL_GROUP: 1})(EncoderActor)  # type: ignore[call-overload]
    return actor.options(**options).remote(name=f"encoder-{index}", encoder=encoder)

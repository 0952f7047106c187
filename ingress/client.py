"""A real WebRTC viewer in Python (aiortc), for the tests, the bench and operators.

`watch` signals through the HTTP contract, receives one device's video, decodes it with
aiortc's H.264 decoder and reads the synthetic stamp from every decoded frame. It runs on
the caller's event loop. Mind the receiver when reading its latencies: aiortc's jitter
buffer releases a frame only when the next frame's first packet arrives, which adds one
frame interval that a browser does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from actors.stamp import STAMP_HEIGHT, read_stamp, stamp_age_ms

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedFrame:
    """One decoded frame and what its stamp says."""

    index: int
    capture_ms: int
    """Capture wall-clock time in ms mod 2**32, from the stamp."""
    received_ms: int
    """Wall-clock time when the decoded frame came out of aiortc, ms mod 2**32."""
    width: int
    height: int

    @property
    def latency_ms(self) -> int:
        return stamp_age_ms(self.capture_ms, self.received_ms)


@dataclass
class WatchResult:
    """What a viewer saw."""

    device_id: str
    session_id: str = ""
    frames: list[ReceivedFrame] = field(default_factory=list)
    decode_errors: int = 0
    answer_s: float = 0.0
    """Seconds from sending the offer to receiving the answer."""
    first_frame_s: float | None = None
    """Seconds from the answer to the first decoded frame."""

    @property
    def indices(self) -> list[int]:
        return [f.index for f in self.frames]

    @property
    def latencies_ms(self) -> list[int]:
        return [f.latency_ms for f in self.frames]

    def fps(self) -> float:
        """Decoded frames per second, from the stamps' capture times."""
        if len(self.frames) < 2:
            return 0.0
        span = stamp_age_ms(self.frames[0].capture_ms, self.frames[-1].capture_ms) / 1000
        return (len(self.frames) - 1) / span if span > 0 else 0.0


class _DecodeErrors(logging.Handler):
    """Counts aiortc's 'failed to decode' warnings (its receiver logs and goes on)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "failed to decode" in record.getMessage():
            self.count += 1


class SignallingError(RuntimeError):
    """The ingress refused the offer; `status` and `error` are its answer."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"{status}: {error}")
        self.status = status
        self.error = error


async def watch(
    base_url: str,
    device_id: str,
    *,
    frames: int = 90,
    timeout: float = 30.0,
    token: str | None = None,
    leave: bool = True,
) -> WatchResult:
    """Watch `device_id` until `frames` frames are decoded or `timeout` passes."""
    result = WatchResult(device_id=device_id)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    errors = _DecodeErrors()
    receiver_log = logging.getLogger("aiortc.rtcrtpreceiver")
    receiver_log.addHandler(errors)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    got_track: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    @pc.on("track")
    def on_track(track: object) -> None:
        if not got_track.done():
            got_track.set_result(track)

    try:
        async with aiohttp.ClientSession(base_url, headers=headers) as http:
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            sent = time.monotonic()
            async with http.post(
                f"/api/devices/{device_id}/sessions",
                json={"sdp": pc.localDescription.sdp, "type": "offer"},
            ) as response:
                body = await response.json()
                if response.status != 201:
                    raise SignallingError(response.status, body.get("error", ""))
            answered = time.monotonic()
            result.answer_s = answered - sent
            result.session_id = body["session_id"]
            await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], body["type"]))
            deadline = answered + timeout
            track = await asyncio.wait_for(got_track, timeout)
            while len(result.frames) < frames:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    frame = await asyncio.wait_for(track.recv(), remaining)  # type: ignore[attr-defined]
                except (TimeoutError, MediaStreamError):
                    break
                received_ms = int(time.time() * 1000) % (1 << 32)
                if result.first_frame_s is None:
                    result.first_frame_s = time.monotonic() - answered
                plane = frame.planes[0]
                luma = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
                index, capture_ms = read_stamp(luma[:STAMP_HEIGHT])
                result.frames.append(
                    ReceivedFrame(index, capture_ms, received_ms, frame.width, frame.height)
                )
            if leave:
                async with http.delete(f"/api/sessions/{result.session_id}") as response:
                    if response.status not in (204, 404):
                        logger.warning("DELETE session answered %s", response.status)
    finally:
        with contextlib.suppress(Exception):
            await pc.close()
        receiver_log.removeHandler(errors)
        result.decode_errors = errors.count
    return result

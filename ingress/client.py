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
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from actors.stamp import STAMP_HEIGHT, read_stamp, stamp_age_ms

logger = logging.getLogger(__name__)

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


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
    pts: int | None = None
    """The decoded frame's pts (from its RTP timestamp)."""

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


#: The RTP header extension aiortc's receiver needs to estimate bandwidth (REMB).
ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"


class Viewer:
    """One WebRTC viewer of one device: connect, read decoded frames, send input."""

    def __init__(
        self,
        base_url: str,
        device_id: str,
        *,
        token: str | None = None,
        input: bool = False,
        remb: bool = True,
    ) -> None:
        """`remb=False` leaves abs-send-time out of the offer: aiortc then sends no
        bandwidth estimate, so this viewer does not steer the encoder's bitrate."""
        self.base_url = base_url
        self.device_id = device_id
        self.remb = remb
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.want_input = input
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.session_id = ""
        self.answer_s = 0.0
        self.answered_at = 0.0
        self.decode_errors = _DecodeErrors()
        self._track: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._channel: Any = None
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            if not self._track.done():
                self._track.set_result(track)

    async def connect(self) -> None:
        """Offer, get the answer (raises SignallingError on a refusal)."""
        logging.getLogger("aiortc.rtcrtpreceiver").addHandler(self.decode_errors)
        self.pc.addTransceiver("video", direction="recvonly")
        if self.want_input:
            self._channel = self.pc.createDataChannel("input")
            opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

            def on_open() -> None:
                if not opened.done():
                    opened.set_result(True)

            self._channel.on("open", on_open)
            self._channel.on(
                "message", lambda message: self._replies.put_nowait(json.loads(message))
            )
            self._opened = opened
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sent = time.monotonic()
        sdp = self.pc.localDescription.sdp
        if not self.remb:
            sdp = "".join(
                line for line in sdp.splitlines(keepends=True) if ABS_SEND_TIME not in line
            )
        offer = {"sdp": sdp, "type": "offer"}
        path = f"/api/devices/{self.device_id}/sessions"
        async with (
            aiohttp.ClientSession(
                self.base_url, headers=self.headers, timeout=HTTP_TIMEOUT
            ) as http,
            http.post(path, json=offer) as response,
        ):
            body = await response.json()
            if response.status != 201:
                raise SignallingError(response.status, body.get("error", ""))
        self.answered_at = time.monotonic()
        self.answer_s = self.answered_at - sent
        self.session_id = body["session_id"]
        await self.pc.setRemoteDescription(RTCSessionDescription(body["sdp"], body["type"]))

    async def next_frame(self, timeout: float) -> tuple[ReceivedFrame, Any] | None:
        """The next decoded frame and its stamp, or None on timeout or end."""
        try:
            track = await asyncio.wait_for(asyncio.shield(self._track), timeout)
            frame = await asyncio.wait_for(track.recv(), timeout)
        except (TimeoutError, MediaStreamError):
            return None
        received_ms = int(time.time() * 1000) % (1 << 32)
        plane = frame.planes[0]
        luma = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        index, capture_ms = read_stamp(luma[:STAMP_HEIGHT])
        received = ReceivedFrame(
            index, capture_ms, received_ms, frame.width, frame.height, frame.pts
        )
        return received, frame

    async def send_input(self, event: dict[str, Any] | str, timeout: float = 5.0) -> dict[str, Any]:
        """Send one input message and return the ingress's reply."""
        if self._channel is None:
            raise RuntimeError("this viewer was created without input=True")
        await asyncio.wait_for(self._opened, timeout)
        self._channel.send(event if isinstance(event, str) else json.dumps(event))
        return await asyncio.wait_for(self._replies.get(), timeout)

    async def send_remb(self, bitrate: int) -> None:
        """Send a REMB estimate, as a browser's congestion control does."""
        from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, pack_remb_fci

        receiver = self.pc.getTransceivers()[0].receiver
        ssrcs = [s.source for s in receiver.getSynchronizationSources()]
        packet = RtcpPsfbPacket(
            fmt=RTCP_PSFB_APP, ssrc=1, media_ssrc=0, fci=pack_remb_fci(bitrate, ssrcs)
        )
        await receiver._send_rtcp(packet)

    async def send_pli(self) -> None:
        """Ask for a keyframe, as a receiver that lost a picture does."""
        receiver = self.pc.getTransceivers()[0].receiver
        for source in receiver.getSynchronizationSources():
            await receiver._send_rtcp_pli(source.source)

    async def vanish(self) -> None:
        """Stop answering without a goodbye (no DELETE, no DTLS close): a lost viewer."""
        transport = self.pc.getTransceivers()[0].receiver.transport
        await transport.transport.stop()

    async def close(self, *, leave: bool = True) -> None:
        """Leave politely (DELETE, then close) or just close the PeerConnection."""
        try:
            if leave and self.session_id:
                async with (
                    aiohttp.ClientSession(
                        self.base_url, headers=self.headers, timeout=HTTP_TIMEOUT
                    ) as http,
                    http.delete(f"/api/sessions/{self.session_id}") as response,
                ):
                    if response.status not in (204, 404):
                        logger.warning("DELETE session answered %s", response.status)
        finally:
            with contextlib.suppress(Exception):
                await self.pc.close()
            logging.getLogger("aiortc.rtcrtpreceiver").removeHandler(self.decode_errors)


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
    viewer = Viewer(base_url, device_id, token=token)
    try:
        await viewer.connect()
        result.session_id = viewer.session_id
        result.answer_s = viewer.answer_s
        deadline = viewer.answered_at + timeout
        while len(result.frames) < frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            got = await viewer.next_frame(remaining)
            if got is None:
                break
            if result.first_frame_s is None:
                result.first_frame_s = time.monotonic() - viewer.answered_at
            result.frames.append(got[0])
    finally:
        await viewer.close(leave=leave and bool(viewer.session_id))
        result.decode_errors = viewer.decode_errors.count
    return result

"""Viewer sessions: one aiortc PeerConnection per viewer, sending pre-encoded H.264.

Runs on the ingress's event loop. The answerer side follows DESIGN decision 8: create the
sending transceiver and set H.264 (Constrained Baseline, packetization-mode 1) as the only
codec before applying the viewer's offer, so aiortc cannot answer VP8. The track hands
aiortc `av.Packet`s with pts and time_base set; aiortc packetizes them without
re-encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from fractions import Fraction

import av
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription

from ingress.hub import DeviceHub, ViewerFeed

logger = logging.getLogger(__name__)

VIDEO_TIME_BASE = Fraction(1, 90_000)
#: The profile both Chromium and aiortc speak (DESIGN decision 8).
H264_PROFILE = "42e01f"


class SdpError(ValueError):
    """The viewer's offer cannot be used; the message names what is wrong."""


class ViewerTrack(MediaStreamTrack):
    """A video track that yields the hub's access units as `av.Packet`s."""

    kind = "video"

    def __init__(self, feed: ViewerFeed) -> None:
        super().__init__()
        self.feed = feed

    async def recv(self) -> av.Packet:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        unit = await self.feed.next_unit()
        if unit is None:
            self.stop()
            raise MediaStreamError
        packet = av.Packet(unit.data)
        packet.pts = unit.pts
        packet.dts = unit.pts
        packet.time_base = VIDEO_TIME_BASE
        self.feed.hub.record_sent(unit)
        return packet


def check_offer(sdp: object) -> None:
    """Raise SdpError unless `sdp` is an offer aiortc can answer with H.264 video."""
    if not isinstance(sdp, str) or not sdp.strip():
        raise SdpError("sdp: must be a non-empty string")
    if not sdp.lstrip().startswith("v=0"):
        raise SdpError("sdp: not an SDP description (must start with 'v=0')")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:  # noqa: BLE001 - aiortc's parser raises many kinds
        raise SdpError(f"sdp: cannot be parsed ({type(exc).__name__}: {exc})") from exc
    videos = [m for m in parsed.media if m.kind == "video"]
    if not videos:
        raise SdpError("sdp: the offer has no video media section")
    for media in videos:
        for codec in media.rtp.codecs:
            if (
                codec.mimeType.lower() == "video/h264"
                and str(codec.parameters.get("packetization-mode", "0")) == "1"
            ):
                if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
                    raise SdpError("sdp: the video section has no ICE credentials")
                if media.dtls is None or not media.dtls.fingerprints:
                    raise SdpError("sdp: the video section has no DTLS fingerprint")
                return
    raise SdpError("sdp: the offer has no H.264 (packetization-mode=1) video codec")


def h264_preferences() -> list:
    """aiortc's H.264 codecs of profile 42e01f, packetization-mode 1, plus RTX."""
    codecs = RTCRtpSender.getCapabilities("video").codecs
    chosen = [
        c
        for c in codecs
        if c.mimeType.lower() == "video/h264"
        and c.parameters.get("packetization-mode") == "1"
        and str(c.parameters.get("profile-level-id", "")).lower() == H264_PROFILE
    ]
    return chosen + [c for c in codecs if c.mimeType.lower() == "video/rtx"]


class ViewerSession:
    """One viewer of one device."""

    def __init__(self, hub: DeviceHub, on_closed: Callable[[ViewerSession], None]) -> None:
        self.id = secrets.token_urlsafe(16)
        self.hub = hub
        self.device_id = hub.device_id
        self.created = time.monotonic()
        self.feed = hub.add_viewer()
        self.track = ViewerTrack(self.feed)
        # No STUN/TURN servers: aiortc's default would contact a public STUN server.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._on_closed = on_closed
        self._closed = False
        self.pc.on("connectionstatechange", self._on_state)

    async def answer(self, offer_sdp: str) -> str:
        """Apply the viewer's offer and return the answer SDP (ICE candidates included)."""
        transceiver = self.pc.addTransceiver(self.track, direction="sendonly")
        transceiver.setCodecPreferences(h264_preferences())
        # aiortc answers a PLI/FIR by flagging its own encoder, which pre-encoded packets
        # never use (DESIGN decision 6): route it to the stream's encoder instead.
        transceiver.sender._send_keyframe = lambda: self.hub.request_keyframe("PLI/FIR")  # type: ignore[method-assign]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        return self.pc.localDescription.sdp

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        logger.info("viewer %s of %s: connection %s", self.id, self.device_id, state)
        if state in ("failed", "closed"):
            await self.close()

    async def close(self) -> None:
        """Close the PeerConnection and leave the hub (idempotent, never hangs)."""
        if self._closed:
            return
        self._closed = True
        self.hub.remove_viewer(self.feed)
        self.track.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pc.close(), timeout=5.0)
        self._on_closed(self)

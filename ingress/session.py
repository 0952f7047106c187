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
import json
import logging
import secrets
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RtcpPsfbPacket,
    unpack_remb_fci,
)
from aiortc.sdp import SessionDescription

from actors.input import InputError, parse_event
from configs.schema import IngressConfig
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


InputSink = Callable[[dict[str, Any]], Any]


class ViewerSession:
    """One viewer of one device: its PeerConnection, its feed, its input channel.

    Feedback is hooked in one place, `_hook_feedback`: aiortc answers PLI/FIR and REMB by
    adjusting its own encoder, which pre-encoded packets never use (DESIGN decision 6);
    here a PLI/FIR becomes a (debounced) keyframe request to the stream's encoder and a
    REMB an estimate the hub turns into the encoder's bitrate. Every RTCP packet also
    proves the viewer is still there: a connected session that hears none for
    `idle_timeout_s`, or that never connects within `connect_timeout_s`, is closed.
    """

    def __init__(
        self,
        hub: DeviceHub,
        on_closed: Callable[[ViewerSession], None],
        *,
        config: IngressConfig,
        can_input: bool = True,
        input_sink: InputSink | None = None,
    ) -> None:
        self.id = secrets.token_urlsafe(16)
        self.hub = hub
        self.device_id = hub.device_id
        self.config = config
        self.can_input = can_input
        self._input_sink = input_sink
        self.created = time.monotonic()
        self.last_rtcp = self.created
        self.feed = hub.add_viewer()
        self.track = ViewerTrack(self.feed)
        # No STUN/TURN servers: aiortc's default would contact a public STUN server.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._on_closed = on_closed
        self._closed = False
        self._watchdog: asyncio.Task[None] | None = None
        self._tokens = 2 * config.input_rate_per_s
        self._tokens_at = self.created
        self.inputs_forwarded = 0
        self.inputs_refused: dict[str, int] = {}
        self.pc.on("connectionstatechange", self._on_state)
        self.pc.on("datachannel", self._on_datachannel)

    async def answer(self, offer_sdp: str) -> str:
        """Apply the viewer's offer and return the answer SDP (ICE candidates included)."""
        transceiver = self.pc.addTransceiver(self.track, direction="sendonly")
        transceiver.setCodecPreferences(h264_preferences())
        self._hook_feedback(transceiver.sender)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        return self.pc.localDescription.sdp

    def _hook_feedback(self, sender: RTCRtpSender) -> None:
        original = sender._handle_rtcp_packet

        async def handle_rtcp(packet: Any) -> None:
            self.last_rtcp = time.monotonic()
            if isinstance(packet, RtcpPsfbPacket):
                if packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                    self.hub.request_keyframe("PLI/FIR")
                    return
                if packet.fmt == RTCP_PSFB_APP:
                    with contextlib.suppress(ValueError):
                        bitrate, _ssrcs = unpack_remb_fci(packet.fci)
                        self.hub.report_estimate(self.feed, bitrate)
            await original(packet)

        sender._handle_rtcp_packet = handle_rtcp  # type: ignore[method-assign]

    async def _watch(self) -> None:
        """Close a session that never connects, or whose viewer went silent."""
        try:
            while not self._closed:
                await asyncio.sleep(min(1.0, self.config.idle_timeout_s / 4))
                now = time.monotonic()
                state = self.pc.connectionState
                if state != "connected" and now - self.created > self.config.connect_timeout_s:
                    logger.info("viewer %s never connected: closing", self.id)
                    break
                if state == "connected" and now - self.last_rtcp > self.config.idle_timeout_s:
                    logger.info(
                        "viewer %s silent for %.0f s: closing", self.id, now - self.last_rtcp
                    )
                    break
        except asyncio.CancelledError:
            return
        await self.close()

    # -- input ------------------------------------------------------------------------

    def _on_datachannel(self, channel: Any) -> None:
        if channel.label != "input":
            channel.close()
            return

        @channel.on("message")
        def on_message(message: str | bytes) -> None:
            reply = self.handle_input(message)
            if channel.readyState == "open":
                channel.send(json.dumps(reply))

    def handle_input(self, message: str | bytes) -> dict[str, Any]:
        """Validate, rate-limit and forward one input message; return the reply to send."""
        if not self.can_input:
            return self._refuse("token", "this session's token is view-only: no input")
        now = time.monotonic()
        rate = self.config.input_rate_per_s
        self._tokens = min(2 * rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 1:
            return self._refuse("rate", f"more than {rate:g} input events per second")
        self._tokens -= 1
        try:
            event = parse_event(message)
        except InputError as exc:
            return self._refuse("invalid", str(exc))
        if self._input_sink is None:
            return self._refuse("device", "this device takes no input")
        try:
            self._input_sink(event.model_dump())
        except Exception as exc:  # noqa: BLE001 - a failed forward is the viewer's answer
            return self._refuse("device", f"forwarding failed: {exc}")
        self.inputs_forwarded += 1
        return {"ok": event.type}

    def _refuse(self, reason: str, message: str) -> dict[str, Any]:
        self.inputs_refused[reason] = self.inputs_refused.get(reason, 0) + 1
        return {"error": message}

    # -- lifecycle --------------------------------------------------------------------

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
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not asyncio.current_task():
            watchdog.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pc.close(), timeout=5.0)
        self._on_closed(self)

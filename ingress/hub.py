"""Per-device fan-out: one encoded stream, any number of viewers, no re-encoding.

Everything here runs on the ingress's event loop. `DeviceHub.push` takes each access unit
from the stream's encoder, gives it an RTP-ready pts and offers it to every viewer's
`ViewerFeed`. A feed is a small bounded queue: a viewer that falls behind loses what is
queued, skips to the next keyframe and asks for one (debounced), so it never slows the
other viewers. Nothing is dropped without a count.

Timestamps: pts is 90 kHz from the capture wall clock, relative to the hub's first unit,
and never goes backwards (a unit whose clock would move it back gets previous pts + 1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors import metrics
from actors.encoder import PUSH_BUDGET_MS, EncodedUnit
from actors.stats import percentile

logger = logging.getLogger(__name__)

#: Two keyframe requests closer than this are one request.
KEYFRAME_DEBOUNCE_S = 0.5
#: Most access units kept from the last keyframe on, for devices whose encoder cannot be
#: asked for a keyframe (screenrecord passthrough): a new viewer starts from them.
GOP_CACHE_MAX = 600
#: The encoder's bitrate follows the viewers' REMB at most this often.
BITRATE_EVERY_S = 1.0
#: A device that sent nothing for this long is `stalled`.
STALL_AFTER_S = 2.0


@dataclass(frozen=True)
class OutgoingUnit:
    """An access unit as viewers receive it."""

    data: bytes
    pts: int
    """90 kHz, monotonic per device."""
    keyframe: bool
    capture_ms: float
    seq: int


class ViewerFeed:
    """One viewer's queue of access units."""

    def __init__(self, hub: DeviceHub, maxsize: int) -> None:
        self.hub = hub
        self.queue: asyncio.Queue[OutgoingUnit | None] = asyncio.Queue(maxsize)
        self.waiting_for_keyframe = True
        self.closed = False
        self.units_sent = 0
        self.skipped: dict[str, int] = {}
        self.estimate_bps: int | None = None
        """The viewer's last REMB estimate."""

    def _skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.hub.count_drop(reason, count)

    def offer(self, unit: OutgoingUnit) -> None:
        if self.closed:
            return
        if self.waiting_for_keyframe:
            if not unit.keyframe:
                self._skip("waiting_for_keyframe")
                return
            self.waiting_for_keyframe = False
        if self.queue.full():
            # Behind by a whole queue: what is queued cannot be shown in time. Drop it,
            # resume at the next keyframe, and ask the encoder for one.
            lost = self.queue.qsize() + 1
            while not self.queue.empty():
                self.queue.get_nowait()
            self.waiting_for_keyframe = True
            self._skip("slow_viewer", lost)
            self.hub.request_keyframe("slow viewer")
            return
        self.queue.put_nowait(unit)

    async def next_unit(self) -> OutgoingUnit | None:
        """The next unit, or None once the feed is closed."""
        if self.closed and self.queue.empty():
            return None
        unit = await self.queue.get()
        if unit is not None:
            self.units_sent += 1
        return unit

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)  # wakes a waiting next_unit()


class DeviceHub:
    """Fan-out of one device's encoded stream."""

    def __init__(
        self,
        device_id: str,
        *,
        queue_size: int = 60,
        request_keyframe: Callable[[], Any] | None = None,
        cache_gop: bool = False,
    ) -> None:
        self.device_id = device_id
        self.gop: list[OutgoingUnit] | None = [] if cache_gop else None
        self.encoder_name: str | None = None
        self.queue_size = queue_size
        self._request_keyframe = request_keyframe
        self._set_bitrate: Callable[[int | None], Any] | None = None
        self.bitrate_requested: int | None = None
        self._bitrate_at = 0.0
        self.feeds: set[ViewerFeed] = set()
        self.units_in = 0
        self.bytes_in = 0
        self.keyframes_in = 0
        self.keyframe_requests = 0
        self.push_over_budget = 0
        self.dropped: dict[str, int] = {}
        self._epoch_ms: float | None = None
        self._last_pts = -1
        self._last_seq = -1
        self._last_request = -KEYFRAME_DEBOUNCE_S
        self._wanted_at = 0.0
        self._last_keyframe_at = 0.0
        self._deferred: asyncio.TimerHandle | None = None
        self._last_unit_at = 0.0
        self._gauges_at = 0.0
        self._arrivals: deque[tuple[float, int]] = deque(maxlen=300)
        self.hub_latency_ms: deque[float] = deque(maxlen=1000)
        self.send_latency_ms: deque[float] = deque(maxlen=1000)
        self.encode_ms: deque[float] = deque(maxlen=300)
        # Where capture-to-ingress time goes: before the encoder starts (object store,
        # actor call, queue), and from the encoder's end to here (the push call).
        self.to_encoder_ms: deque[float] = deque(maxlen=1000)
        self.push_ms: deque[float] = deque(maxlen=1000)

    def set_keyframe_requester(self, request_keyframe: Callable[[], Any] | None) -> None:
        self._request_keyframe = request_keyframe

    def set_bitrate_setter(self, set_bitrate: Callable[[int | None], Any] | None) -> None:
        self._set_bitrate = set_bitrate

    def report_estimate(self, feed: ViewerFeed, bps: int) -> None:
        """A viewer's REMB: the encoder follows the lowest estimate of all viewers."""
        feed.estimate_bps = bps
        self._follow_estimates(at_once=False)

    def _follow_estimates(self, *, at_once: bool) -> None:
        """Set the encoder to the lowest estimate of the viewers here, or back to the
        configured bitrate (None) when no viewer has sent one: a viewer on a slow link
        that leaves no longer holds the others down. Estimates move the bitrate at most
        once per BITRATE_EVERY_S; a viewer leaving moves it at once."""
        if self._set_bitrate is None:
            return
        estimates = [f.estimate_bps for f in self.feeds if f.estimate_bps]
        target = min(estimates) if estimates else None
        now = time.monotonic()
        if target == self.bitrate_requested or (
            not at_once and now - self._bitrate_at < BITRATE_EVERY_S
        ):
            return
        self._bitrate_at = now
        self.bitrate_requested = target
        try:
            self._set_bitrate(target)
        except Exception:
            logger.exception("%s: setting the bitrate failed", self.device_id)

    def count_drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        metrics.inc("frames_dropped", count, device=self.device_id, stage="ingress", reason=reason)

    def request_keyframe(self, why: str) -> None:
        """Ask the encoder for an IDR, at most once per KEYFRAME_DEBOUNCE_S.

        A request inside the debounce window is not lost: it is retried when the window
        ends, unless a keyframe has arrived since it was made (a burst of PLIs, or a few
        viewers joining together, costs one IDR; a viewer joining just after another
        still gets one).
        """
        now = time.monotonic()
        self._wanted_at = now
        wait = KEYFRAME_DEBOUNCE_S - (now - self._last_request)
        if wait <= 0:
            self._send_keyframe_request(why)
            return
        if self._deferred is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._deferred = loop.call_later(wait, self._deferred_request)

    def _deferred_request(self) -> None:
        self._deferred = None
        if self._wanted_at > self._last_keyframe_at:
            self._send_keyframe_request("deferred")

    def _send_keyframe_request(self, why: str) -> None:
        if self._request_keyframe is None:
            return
        self._last_request = time.monotonic()
        self.keyframe_requests += 1
        logger.debug("%s: keyframe requested (%s)", self.device_id, why)
        try:
            self._request_keyframe()
        except Exception:
            logger.exception("%s: keyframe request failed", self.device_id)

    def set_encoder(self, name: str | None) -> None:
        """The encoder now carrying this stream; units of any other are refused.

        After a failover the old encoder may still deliver a few units (its node was
        slow, not gone): they belong to another decoding chain. Viewers resume at the new
        encoder's first unit, an IDR.
        """
        if name != self.encoder_name:
            self.encoder_name = name
            for feed in self.feeds:
                feed.waiting_for_keyframe = True

    def push(self, unit: EncodedUnit) -> None:
        """Take one access unit from the encoder and offer it to every viewer."""
        if unit.encoder and self.encoder_name and unit.encoder != self.encoder_name:
            self.count_drop("old_encoder")
            return
        now_ms = time.time() * 1000
        if unit.seq < self._last_seq:
            # Should not happen (one encoder thread submits in order); if it does, the
            # unit cannot be decoded in place: drop it and resync viewers on a keyframe.
            self.count_drop("out_of_order")
            for feed in self.feeds:
                feed.waiting_for_keyframe = True
            self.request_keyframe("out of order unit")
            return
        self._last_seq = unit.seq
        if self._epoch_ms is None:
            self._epoch_ms = unit.capture_ms
        pts = max(int((unit.capture_ms - self._epoch_ms) * 90), self._last_pts + 1)
        self._last_pts = pts
        self.units_in += 1
        self.bytes_in += len(unit.data)
        self.keyframes_in += int(unit.keyframe)
        if unit.keyframe:
            self._last_keyframe_at = time.monotonic()
        self._last_unit_at = time.monotonic()
        self._arrivals.append((self._last_unit_at, len(unit.data)))
        self.hub_latency_ms.append(now_ms - unit.capture_ms)
        self.encode_ms.append(unit.encode_ms)
        self.to_encoder_ms.append(unit.encoded_ms - unit.encode_ms - unit.capture_ms)
        self.push_ms.append(now_ms - unit.encoded_ms)
        if now_ms - unit.encoded_ms > PUSH_BUDGET_MS:
            # Late, but delivered: dropping an encoded unit breaks decoding until an IDR.
            self.push_over_budget += 1
        if self._last_unit_at - self._gauges_at >= 1.0:
            self._gauges_at = self._last_unit_at
            metrics.set_gauge("viewers", self.viewers, device=self.device_id)
            metrics.set_gauge("bitrate_bps", self.rates()[1], device=self.device_id)
        out = OutgoingUnit(unit.data, pts, unit.keyframe, unit.capture_ms, unit.seq)
        if self.gop is not None:
            if out.keyframe:
                self.gop = [out]
            elif self.gop and len(self.gop) < GOP_CACHE_MAX:
                self.gop.append(out)
            elif self.gop:
                self.gop = []  # too long to replay: wait for the next keyframe
        for feed in self.feeds:
            feed.offer(out)

    def add_viewer(self) -> ViewerFeed:
        feed = ViewerFeed(self, self.queue_size)
        self.feeds.add(feed)
        if self.gop and len(self.gop) <= self.queue_size:
            # Start from the cached keyframe and what followed it: the device's encoder
            # cannot be asked for a new one.
            for unit in self.gop:
                feed.offer(unit)
        # A new viewer starts on a keyframe; ask for one now rather than wait a GOP.
        self.request_keyframe("new viewer")
        return feed

    def remove_viewer(self, feed: ViewerFeed) -> None:
        feed.close()
        self.feeds.discard(feed)
        if feed.estimate_bps is not None:
            self._follow_estimates(at_once=True)

    def record_sent(self, unit: OutgoingUnit) -> None:
        """A viewer's sender took `unit` (the packet handed to WebRTC)."""
        latency = time.time() * 1000 - unit.capture_ms
        self.send_latency_ms.append(latency)
        metrics.observe("capture_to_send_ms", latency, device=self.device_id)

    @property
    def viewers(self) -> int:
        return len(self.feeds)

    def status(self) -> str:
        if self.units_in == 0:
            return "starting"
        return "live" if time.monotonic() - self._last_unit_at < STALL_AFTER_S else "stalled"

    def rates(self) -> tuple[float, float]:
        """(units per second, bits per second) over the last few seconds."""
        arrivals = [a for a in self._arrivals if time.monotonic() - a[0] < 3.0]
        if len(arrivals) < 2:
            return 0.0, 0.0
        span = arrivals[-1][0] - arrivals[0][0]
        if span <= 0:
            return 0.0, 0.0
        fps = (len(arrivals) - 1) / span
        bps = sum(size for _, size in arrivals[1:]) * 8 / span
        return round(fps, 2), round(bps)

    def stats(self) -> dict[str, Any]:
        fps, bps = self.rates()
        return {
            "status": self.status(),
            "units_in": self.units_in,
            "keyframes_in": self.keyframes_in,
            "keyframe_requests": self.keyframe_requests,
            "push_over_budget": self.push_over_budget,
            "bitrate_requested_bps": self.bitrate_requested,
            "bytes_in": self.bytes_in,
            "fps": fps,
            "bitrate_bps": bps,
            "viewers": self.viewers,
            "dropped": dict(self.dropped),
            "encode_ms_p50": percentile(self.encode_ms, 50),
            "encode_ms_p99": percentile(self.encode_ms, 99),
            "capture_to_encoder_ms_p50": percentile(self.to_encoder_ms, 50),
            "capture_to_encoder_ms_p99": percentile(self.to_encoder_ms, 99),
            "encoder_to_ingress_ms_p50": percentile(self.push_ms, 50),
            "encoder_to_ingress_ms_p99": percentile(self.push_ms, 99),
            "capture_to_ingress_ms_p50": percentile(self.hub_latency_ms, 50),
            "capture_to_ingress_ms_p99": percentile(self.hub_latency_ms, 99),
            "capture_to_send_ms_p50": percentile(self.send_latency_ms, 50),
            "capture_to_send_ms_p99": percentile(self.send_latency_ms, 99),
        }

    def close(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        for feed in list(self.feeds):
            self.remove_viewer(feed)

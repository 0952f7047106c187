"""The ingress: the HTTP contract of DESIGN.md, viewer sessions, and the device hubs.

`IngressServer` is a plain class that runs an aiohttp site on the event loop it is started
on (in the pipeline: the `ingress` actor's loop, see `ingress.actor`). Encoded units
arrive through `push`; stats of the other actors are gathered through the callables the
driver registers, with a timeout, so a slow actor never stalls `/api/stats`.

Routes (fixed by DESIGN.md): GET /healthz, GET /, GET /api/devices,
POST /api/devices/{id}/sessions, DELETE /api/sessions/{id}, GET /api/stats.
Every error is JSON `{"error": "..."}` naming the field at fault.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web

from actors import metrics
from actors.encoder import EncodedUnit
from actors.stats import process_resources
from configs.schema import DeviceConfig, IngressConfig
from ingress.hub import DeviceHub
from ingress.session import SdpError, ViewerSession, check_offer

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
STATS_TIMEOUT_S = 2.0

StatsSource = Callable[[], Awaitable[dict[str, Any]]]


@dataclass
class DeviceEntry:
    """What the ingress knows of one device."""

    config: DeviceConfig
    hub: DeviceHub
    encoder: dict[str, Any] = field(default_factory=dict)
    """The encoder carrying the stream: name, node, hwaccel."""
    capture_stats: StatsSource | None = None
    input_sink: Callable[[dict[str, Any]], Any] | None = None
    capture_status: str = "idle"
    offline_reason: str | None = None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class IngressServer:
    """Owns the hubs, the viewer sessions and the HTTP site."""

    def __init__(self, *, config: IngressConfig) -> None:
        self.config = config
        self.devices: dict[str, DeviceEntry] = {}
        self.sessions: dict[str, ViewerSession] = {}
        self.encoder_stats: dict[str, StatsSource] = {}
        self.ready = False
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self.started_at = time.time()
        self.pool: dict[str, int] = {}
        self.pool_stats: StatsSource | None = None
        self.monitor_sample: StatsSource | None = None

    # -- wiring (called by the driver) ------------------------------------------------

    def add_device(
        self,
        device: DeviceConfig,
        *,
        request_keyframe: Callable[[], Any] | None = None,
        set_bitrate: Callable[[int | None], Any] | None = None,
        capture_stats: StatsSource | None = None,
        input_sink: Callable[[dict[str, Any]], Any] | None = None,
        cache_gop: bool = False,
    ) -> None:
        """Serve `device`; it is `pending` until `set_encoder` names its encoder."""
        entry = self.devices.get(device.id)
        if entry is None:
            hub = DeviceHub(
                device.id,
                queue_size=self.config.viewer_queue,
                request_keyframe=request_keyframe,
                cache_gop=cache_gop,
            )
            entry = self.devices[device.id] = DeviceEntry(config=device, hub=hub)
        else:
            entry.hub.set_keyframe_requester(request_keyframe)
        entry.hub.set_bitrate_setter(set_bitrate)
        entry.capture_stats = capture_stats
        entry.input_sink = input_sink

    def set_encoder(
        self, device_id: str, info: dict[str, Any] | None, stats: StatsSource | None = None
    ) -> None:
        """The encoder now carrying `device_id` (None: the stream waits for capacity)."""
        entry = self.devices.get(device_id)
        if entry is None:
            return
        entry.encoder = dict(info or {})
        entry.hub.set_encoder(entry.encoder.get("name"))
        if info and stats is not None:
            self.encoder_stats[info["name"]] = stats
        used = {e.encoder.get("name") for e in self.devices.values()}
        for name in [n for n in self.encoder_stats if n not in used]:
            del self.encoder_stats[name]

    def set_pool_stats(self, stats: StatsSource) -> None:
        self.pool_stats = stats

    def set_ready(self, ready: bool = True) -> None:
        self.ready = ready

    def pool_state(self, *, capacity: int, streams: int, pending: int) -> None:
        """The encoder pool's state, for /api/stats and the pool gauges."""
        self.pool = {"capacity_streams": capacity, "streams": streams, "pending_streams": pending}
        metrics.set_gauge("pool_capacity_streams", capacity)
        metrics.set_gauge("pool_streams", streams)
        metrics.set_gauge("pool_pending_streams", pending)

    def set_monitor(self, last_sample: StatsSource) -> None:
        """Where /api/stats finds the leak monitor's last sample."""
        self.monitor_sample = last_sample

    def push(self, unit: EncodedUnit) -> None:
        entry = self.devices.get(unit.device_id)
        if entry is None:
            logger.warning("unit for unknown device %r dropped", unit.device_id)
            return
        entry.hub.push(unit)

    # -- lifecycle --------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._cors, self._auth]
        )
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/", self._index)
        app.router.add_get("/api/devices", self._list_devices)
        app.router.add_post("/api/devices/{device_id}/sessions", self._create_session)
        app.router.add_delete("/api/sessions/{session_id}", self._delete_session)
        app.router.add_get("/api/stats", self._stats)
        return app

    async def start(self) -> int:
        """Serve on the configured host and port; return the port bound (idempotent)."""
        if self._runner is not None:
            assert self.port is not None
            return self.port
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno,
                f"ingress.host/ingress.port: cannot listen on "
                f"{self.config.host}:{self.config.port}: {exc.strerror}",
            ) from exc
        self._runner = runner
        server = site._server  # the asyncio server: where port 0 was bound
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        logger.info("ingress listening on http://%s:%s/", self.config.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Close every session and the HTTP site (idempotent)."""
        self.ready = False
        await asyncio.gather(
            *(session.close() for session in list(self.sessions.values())),
            return_exceptions=True,
        )
        for entry in self.devices.values():
            entry.hub.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- middlewares ------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body: larger than {MAX_BODY_BYTES} bytes")
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _error(exc.status, exc.reason or "error")
            raise
        except Exception:
            logger.exception("%s %s failed", request.method, request.path)
            return _error(500, "internal error; see the ingress actor's log")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Bearer tokens on /api/*: `token` may do everything, `view_token` only watch."""
        full, view = self.config.token, self.config.view_token
        request["access"] = "full"
        if (full or view) and request.path.startswith("/api/") and request.method != "OPTIONS":
            header = request.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not given:
                return _error(401, "Authorization: a 'Bearer <token>' header is required")
            given_bytes = given.strip().encode()
            if full and hmac.compare_digest(given_bytes, full.encode()):
                request["access"] = "full"
            elif view and hmac.compare_digest(given_bytes, view.encode()):
                request["access"] = "view"
            else:
                return _error(401, "Authorization: wrong token")
        return await handler(request)

    @web.middleware
    async def _cors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """CORS only for the configured origins (none by default: the page is same-origin)."""
        origin = request.headers.get("Origin")
        allowed = origin is not None and origin in self.config.cors_origins
        if request.method == "OPTIONS" and request.path.startswith("/api/"):
            if not allowed:
                return _error(403, f"Origin: {origin!r} is not in ingress.cors_origins")
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response = await handler(request)
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = str(origin)
            response.headers["Vary"] = "Origin"
        return response

    # -- handlers ---------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ok"})

    async def _index(self, request: web.Request) -> web.Response:
        page = resources.files("ingress").joinpath("static/index.html").read_text("utf-8")
        return web.Response(text=page, content_type="text/html")

    def _device_summary(self, entry: DeviceEntry) -> dict[str, Any]:
        return {
            "id": entry.config.id,
            "status": self._status(entry),
            "width": entry.config.width,
            "height": entry.config.height,
            "fps": entry.config.fps,
            "viewers": entry.hub.viewers,
            "source": entry.config.source.kind,
            "offline_reason": entry.offline_reason if entry.capture_status == "offline" else None,
            "encoder": {
                "name": entry.encoder.get("name"),
                "node": entry.encoder.get("node"),
                "hwaccel": entry.encoder.get("hwaccel"),
            },
        }

    def device_status(self, device_id: str, status: str, reason: str | None) -> None:
        """The capture actor's status: `offline` (with why) wins over the stream's."""
        entry = self.devices.get(device_id)
        if entry is not None:
            entry.capture_status, entry.offline_reason = status, reason

    @staticmethod
    def _status(entry: DeviceEntry) -> str:
        if entry.capture_status == "offline":
            return "offline"
        return entry.hub.status() if entry.encoder else "pending"

    async def _list_devices(self, request: web.Request) -> web.Response:
        return web.json_response([self._device_summary(e) for e in self.devices.values()])

    async def _create_session(self, request: web.Request) -> web.Response:
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            return _error(413, f"body: larger than {MAX_BODY_BYTES} bytes")
        device_id = request.match_info["device_id"]
        entry = self.devices.get(device_id)
        if entry is None:
            return _error(404, f"device: no device with id {device_id!r}")
        body = await request.read()  # aiohttp enforces MAX_BODY_BYTES when chunked
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(400, f"body: not valid JSON ({exc})")
        if not isinstance(payload, dict):
            return _error(400, "body: must be a JSON object with 'sdp' and 'type'")
        if payload.get("type") != "offer":
            return _error(400, f"type: must be 'offer', got {payload.get('type')!r}")
        try:
            check_offer(payload.get("sdp"))
        except SdpError as exc:
            return _error(400, str(exc))
        if entry.hub.viewers >= self.config.max_viewers_per_device:
            return _error(
                429,
                f"viewers: device {device_id!r} has reached ingress.max_viewers_per_device "
                f"({self.config.max_viewers_per_device})",
            )
        session = ViewerSession(
            entry.hub,
            on_closed=self._forget,
            config=self.config,
            can_input=request["access"] == "full",
            input_sink=entry.input_sink,
        )
        self.sessions[session.id] = session
        try:
            answer = await session.answer(payload["sdp"])
        except Exception as exc:  # noqa: BLE001 - aiortc rejects offers in many ways
            await session.close()
            logger.info("offer for %s rejected: %s", device_id, exc)
            return _error(400, f"sdp: the offer cannot be answered ({type(exc).__name__}: {exc})")
        return web.json_response(
            {"session_id": session.id, "sdp": answer, "type": "answer"}, status=201
        )

    def _forget(self, session: ViewerSession) -> None:
        self.sessions.pop(session.id, None)

    async def _delete_session(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["session_id"])
        if session is None:
            return _error(404, "session_id: no such session")
        await session.close()
        return web.Response(status=204)

    def resources(self) -> dict[str, int]:
        """Threads, fds, subprocesses and tasks of this process, and what it owns.

        The leak monitor samples it: a viewer that left must leave every count as it
        was before it came.
        """
        return {
            **process_resources(),
            # Counted by aiortc-independent means: the sessions this server holds.
            "peer_connections": len(self.sessions),
            "viewers": sum(e.hub.viewers for e in self.devices.values()),
        }

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(await self.stats())

    async def stats(self) -> dict[str, Any]:
        """Per device and per encoder: counts, rates, latencies, viewers, placement."""
        names = list(self.devices)
        captures = await asyncio.gather(*(_bounded(self.devices[n].capture_stats) for n in names))
        encoder_names = list(self.encoder_stats)
        encoders = await asyncio.gather(*(_bounded(self.encoder_stats[n]) for n in encoder_names))
        by_encoder = dict(zip(encoder_names, encoders, strict=True))
        devices: dict[str, Any] = {}
        for name, capture in zip(names, captures, strict=True):
            entry = self.devices[name]
            hub = entry.hub.stats()
            enc_name = entry.encoder.get("name")
            stream = ((by_encoder.get(enc_name or "") or {}).get("streams") or {}).get(name, {})
            dropped: dict[str, int] = {}
            for stage, counts in (
                ("capture", (capture or {}).get("dropped", {})),
                ("encoder", stream.get("dropped", {})),
                ("ingress", hub["dropped"]),
            ):
                for reason, count in counts.items():
                    dropped[f"{stage}.{reason}"] = count
            devices[name] = {
                "status": self._status(entry),
                "raw_bytes_cross_node": (capture or {}).get("raw_bytes_cross_node"),
                "frames_captured": (capture or {}).get("frames_captured"),
                "frames_encoded": stream.get("frames_encoded", hub["units_in"]),
                "frames_dropped": sum(
                    c for k, c in dropped.items() if not k.endswith("waiting_for_keyframe")
                ),
                "dropped": dropped,
                "capture_fps": (capture or {}).get("fps"),
                "fps": hub["fps"],
                "bitrate_bps": hub["bitrate_bps"],
                "viewers": hub["viewers"],
                # Latency percentiles: encode, and capture to each later stage.
                **{k: v for k, v in hub.items() if k.endswith(("_p50", "_p99"))},
                "keyframes": hub["keyframes_in"],
                "keyframe_requests": hub["keyframe_requests"],
                "push_over_budget": hub["push_over_budget"],
                "node": entry.encoder.get("node"),
                "hwaccel": entry.encoder.get("hwaccel"),
                "encoder": enc_name,
            }
        return {
            "time": time.time(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "sessions": len(self.sessions),
            "pool": {**self.pool, **(await _bounded(self.pool_stats) or {})},
            "monitor": await _bounded(self.monitor_sample),
            "devices": devices,
            "encoders": {n: e for n, e in by_encoder.items()},
        }


async def _bounded(source: StatsSource | None) -> dict[str, Any] | None:
    if source is None:
        return None
    try:
        return await asyncio.wait_for(source(), timeout=STATS_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - a dead or slow actor shows as missing stats
        logger.warning("stats source failed: %s", exc)
        return None

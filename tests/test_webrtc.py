"""End to end on a local Ray: synthetic devices -> encoder actors -> ingress -> aiortc viewer.

Also every route and error status of the HTTP contract (DESIGN.md), with JSON errors.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from actors.stats import percentile
from cluster.pipeline import Pipeline, PipelineInfo
from ingress.client import SignallingError, watch
from tests.conftest import settings, wait_for

TOKEN = "test-token-0123"


@pytest.fixture(scope="module")
def pipeline(ray_local: Any) -> Iterator[PipelineInfo]:
    p = Pipeline(settings(devices=2, ingress={"token": TOKEN, "max_viewers_per_device": 2}))
    try:
        info = p.start()
        yield info
    finally:
        p.stop()


def _request(url: str, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession(url) as http, http.request(method, path, **kwargs) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text and "json" in r.content_type else text)

    return asyncio.run(go())


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def test_aiortc_viewer_decodes_90_frames_in_order(pipeline: PipelineInfo) -> None:
    result = asyncio.run(watch(pipeline.url, "dev-0", frames=90, timeout=30, token=TOKEN))
    indices = result.indices
    assert len(indices) == 90, f"decoded only {len(indices)} frames"
    # Never backwards; a repeat is an all-skip frame from an encoder short of bits.
    assert all(b >= a for a, b in zip(indices, indices[1:], strict=False)), indices
    assert len(set(indices)) >= 85, indices
    assert result.decode_errors == 0
    assert {(f.width, f.height) for f in result.frames} == {(720, 1280)}
    latencies = result.latencies_ms
    # Capture-to-decoded from the stamps: positive and bounded on a loaded 2-core box.
    assert min(latencies) > 0 and max(latencies) < 2000, latencies
    print(
        f"\nviewer: {result.fps():.1f} fps, capture-to-decoded p50 {percentile(latencies, 50)} ms "
        f"p99 {percentile(latencies, 99)} ms, first frame {result.first_frame_s:.3f} s after answer"
    )


def test_health_devices_and_stats(pipeline: PipelineInfo) -> None:
    assert _request(pipeline.url, "GET", "/healthz") == (200, {"status": "ok"})
    status, devices = _request(pipeline.url, "GET", "/api/devices", headers=AUTH)
    assert status == 200
    assert [d["id"] for d in devices] == ["dev-0", "dev-1"]
    for d in devices:
        assert {"id", "status", "width", "height", "fps", "viewers", "encoder"} <= set(d)
        assert (d["width"], d["height"], d["fps"]) == (720, 1280, 30)
        assert d["encoder"]["hwaccel"] == "libx264" and d["encoder"]["node"]
    wait_for(
        lambda: (
            _request(pipeline.url, "GET", "/api/devices", headers=AUTH)[1][0]["status"] == "live"
        ),
        10,
        "dev-0 live",
    )
    status, stats = _request(pipeline.url, "GET", "/api/stats", headers=AUTH)
    assert status == 200
    dev = stats["devices"]["dev-0"]
    for key in (
        "frames_captured",
        "frames_encoded",
        "frames_dropped",
        "fps",
        "encode_ms_p50",
        "capture_to_send_ms_p99",
        "viewers",
        "bitrate_bps",
        "node",
        "hwaccel",
    ):
        assert key in dev, key
    # Capture and encoder are asked one after the other: allow the frames in flight.
    assert dev["frames_captured"] + 2 >= dev["frames_encoded"] > 0
    assert "encoder-0" in stats["encoders"]
    assert stats["encoders"]["encoder-0"]["streams"]["dev-0"]["frames_encoded"] > 0


def test_page_is_served(pipeline: PipelineInfo) -> None:
    status, page = _request(pipeline.url, "GET", "/")
    assert status == 200 and "<video" in page and "/api/devices" in page


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "mentions"),
    [
        ("GET", "/api/devices", {}, 401, "Authorization"),
        ("GET", "/api/stats", {"headers": {"Authorization": "Bearer wrong-token"}}, 401, "wrong"),
        (
            "POST",
            "/api/devices/dev-0/sessions",
            {"headers": {"Authorization": "Basic x"}},
            401,
            "Bearer",
        ),
        ("POST", "/api/devices/nope/sessions", {"headers": AUTH, "json": {}}, 404, "device"),
        (
            "POST",
            "/api/devices/dev-0/sessions",
            {"headers": AUTH, "data": b"{not json"},
            400,
            "JSON",
        ),
        (
            "POST",
            "/api/devices/dev-0/sessions",
            {"headers": AUTH, "json": ["offer"]},
            400,
            "object",
        ),
        (
            "POST",
            "/api/devices/dev-0/sessions",
            {"headers": AUTH, "json": {"type": "answer", "sdp": "v=0"}},
            400,
            "type",
        ),
        (
            "POST",
            "/api/devices/dev-0/sessions",
            {"headers": AUTH, "json": {"type": "offer", "sdp": "hello"}},
            400,
            "sdp",
        ),
        (
            "POST",
            "/api/devices/dev-0/sessions",
            {"headers": AUTH, "json": {"type": "offer", "sdp": "v=0\r\nm=audio 9 RTP/AVP 0\r\n"}},
            400,
            "sdp",
        ),
        (
            "POST",
            "/api/devices/dev-0/sessions",
            {"headers": AUTH, "data": b"{" + b" " * (65 * 1024) + b"}"},
            413,
            "body",
        ),
        ("DELETE", "/api/sessions/does-not-exist", {"headers": AUTH}, 404, "session"),
    ],
)
def test_error_statuses_have_json_bodies(
    pipeline: PipelineInfo,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    mentions: str,
) -> None:
    got, body = _request(pipeline.url, method, path, **kwargs)
    assert got == status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert mentions.lower() in body["error"].lower(), body


def test_viewer_limit_gives_429_and_delete_frees_a_slot(pipeline: PipelineInfo) -> None:
    async def scenario() -> None:
        pcs = []
        sessions = []
        async with aiohttp.ClientSession(pipeline.url, headers=AUTH) as http:
            try:
                for _ in range(2):
                    pc, sdp = await _offer()
                    pcs.append(pc)
                    async with http.post(
                        "/api/devices/dev-1/sessions", json={"sdp": sdp, "type": "offer"}
                    ) as r:
                        assert r.status == 201, await r.text()
                        body = await r.json()
                        assert body["type"] == "answer" and "m=video" in body["sdp"]
                        assert "H264" in body["sdp"] and "VP8" not in body["sdp"]
                        sessions.append(body["session_id"])
                pc, sdp = await _offer()
                pcs.append(pc)
                async with http.post(
                    "/api/devices/dev-1/sessions", json={"sdp": sdp, "type": "offer"}
                ) as r:
                    assert r.status == 429
                    assert "max_viewers_per_device" in (await r.json())["error"]
                async with http.get("/api/devices") as r:
                    viewers = {d["id"]: d["viewers"] for d in await r.json()}
                    assert viewers["dev-1"] == 2
                async with http.delete(f"/api/sessions/{sessions[0]}") as r:
                    assert r.status == 204
                async with http.delete(f"/api/sessions/{sessions[0]}") as r:
                    assert r.status == 404
                async with http.post(
                    "/api/devices/dev-1/sessions", json={"sdp": sdp, "type": "offer"}
                ) as r:
                    assert r.status == 201
                    sessions[0] = (await r.json())["session_id"]
            finally:
                for session_id in sessions:
                    async with http.delete(f"/api/sessions/{session_id}"):
                        pass
                for pc in pcs:
                    await pc.close()

    asyncio.run(scenario())


def test_client_reports_refusal(pipeline: PipelineInfo) -> None:
    with pytest.raises(SignallingError) as info:
        asyncio.run(watch(pipeline.url, "dev-0", frames=1, token="bad-token-123"))
    assert info.value.status == 401

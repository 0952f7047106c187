"""Viewers: fan-out to many, keyframe and bitrate feedback, input, access rules, and no
leaks over many connect/disconnect cycles. Real aiortc viewers over loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import ray

from actors.stats import percentile
from cluster.pipeline import Pipeline
from ingress.client import SignallingError, Viewer, watch
from tests.conftest import base_url, settings, wait_for

TOKEN = "full-token-123"
VIEW = "view-token-123"
ORIGIN = "http://console.example"


@pytest.fixture(scope="module")
def pipeline(ray_local: Any) -> Iterator[Pipeline]:
    with Pipeline(
        settings(
            devices=2,
            pool={"min_workers": 1, "max_workers": 1},
            encoder={"keyframe_interval": 600},
            ingress={
                "token": TOKEN,
                "view_token": VIEW,
                "cors_origins": [ORIGIN],
                "idle_timeout_s": 3,
                "connect_timeout_s": 5,
                "input_rate_per_s": 20,
                "max_viewers_per_device": 64,
            },
        )
    ) as p:
        yield p


def encoder_stream(p: Pipeline, device: str) -> dict[str, Any]:
    name = ray.get(p.pool.stats.remote())["streams"][device]["encoder"]
    return ray.get(ray.get(p.pool.encoder_handles.remote())[name].stats.remote())["streams"][device]


def resources(p: Pipeline) -> dict[str, int]:
    return ray.get(p.ingress.resources.remote())


# -- fan-out ---------------------------------------------------------------------------


def test_ten_viewers_decode_and_a_slow_one_does_not_slow_the_rest(pipeline: Pipeline) -> None:
    async def viewer(slow: bool, seconds: float) -> tuple[int, int, float]:
        v = Viewer(base_url(pipeline), "dev-0", token=TOKEN)
        await v.connect()
        frames: list[int] = []
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                got = await v.next_frame(5)
                if got is None:
                    break
                frames.append(got[0].index)
                if slow:
                    await asyncio.sleep(0.2)  # a viewer that cannot keep up
        finally:
            await v.close()
        # Never backwards. A stamp may repeat: an encoder short of bits (its VBV drained,
        # by an IDR for instance) codes a frame as all-skip, which decodes as the last one.
        ordered = all(b >= a for a, b in zip(frames, frames[1:], strict=False))
        assert ordered, frames
        return len(frames), v.decode_errors.count, seconds

    async def scenario() -> list[tuple[int, int, float]]:
        return await asyncio.gather(*(viewer(slow=(i == 0), seconds=6) for i in range(10)))

    results = asyncio.run(scenario())
    slow, fast = results[0], results[1:]
    fps = [n / s for n, _, s in fast]
    print(f"\n9 viewers beside a slow one: fps min {min(fps):.1f} p50 {percentile(fps, 50)}")
    assert all(errors == 0 for _, errors, _ in results)
    # Everyone decodes; the nine normal viewers keep near the device's 30 fps (the first
    # second goes to ICE/DTLS and the first keyframe), the slow one gets what it reads.
    assert min(fps) > 20, fps
    assert slow[0] < 0.5 * min(n for n, _, _ in fast)


# -- feedback ----------------------------------------------------------------------------


def test_pli_produces_an_idr_and_is_debounced(pipeline: Pipeline) -> None:
    async def scenario() -> tuple[int, int]:
        v = Viewer(base_url(pipeline), "dev-1", token=TOKEN)
        await v.connect()
        try:
            for _ in range(10):
                assert await v.next_frame(10) is not None
            await asyncio.sleep(1.0)  # past the join's keyframe debounce
            before = encoder_stream(pipeline, "dev-1")["keyframes"]
            for _ in range(5):  # a burst of PLIs is one keyframe
                await v.send_pli()
            await asyncio.sleep(0.1)
            for _ in range(20):
                assert await v.next_frame(10) is not None
            return before, encoder_stream(pipeline, "dev-1")["keyframes"]
        finally:
            await v.close()

    before, after = asyncio.run(scenario())
    assert after == before + 1, (before, after)


def test_remb_lowers_the_encoder_bitrate_until_the_viewer_leaves(pipeline: Pipeline) -> None:
    configured = pipeline.settings.encoder.bitrate_bps

    async def scenario() -> None:
        # remb=False: only the estimate sent here, none of aiortc's own.
        v = Viewer(base_url(pipeline), "dev-1", token=TOKEN, remb=False)
        await v.connect()
        try:
            for _ in range(5):
                assert await v.next_frame(10) is not None
            await v.send_remb(400_000)
            await asyncio.to_thread(
                wait_for,
                lambda: encoder_stream(pipeline, "dev-1")["bitrate_bps"] == 400_000,
                10,
                "bitrate 400k",
            )
        finally:
            await v.close()

    asyncio.run(scenario())
    # The viewer that held the bitrate down has left: back to the configured rate.
    wait_for(
        lambda: encoder_stream(pipeline, "dev-1")["bitrate_bps"] == configured,
        10,
        "the configured bitrate",
    )


def test_bitrate_follows_the_lowest_viewer_and_recovers_when_it_leaves() -> None:
    """The hub's part of REMB, on plain objects: lowest estimate, and None at the end."""
    from ingress.hub import DeviceHub

    asked: list[int | None] = []
    hub = DeviceHub("d")
    hub.set_bitrate_setter(asked.append)
    slow, fast, quiet = hub.add_viewer(), hub.add_viewer(), hub.add_viewer()
    hub.report_estimate(slow, 400_000)
    hub.report_estimate(fast, 3_000_000)  # the lowest is still the slow one's
    hub.remove_viewer(quiet)  # it sent no estimate: nothing changes
    assert asked == [400_000]
    hub.remove_viewer(slow)
    assert asked == [400_000, 3_000_000]
    hub.remove_viewer(fast)
    assert asked == [400_000, 3_000_000, None]  # None: the configured bitrate


# -- input -------------------------------------------------------------------------------


def marker_levels(frame: Any, x: float, y: float) -> tuple[float, float]:
    """Mean luma inside the marker's square and on its white ring, centred at (x, y)."""
    luma = frame.to_ndarray()[: frame.height]
    cx, cy = round(x * (frame.width - 1)), round(y * (frame.height - 1))
    inner = luma[cy - 16 : cy + 16, cx - 16 : cx + 16].mean()
    ring = luma[cy - 31 : cy - 29, cx - 20 : cx + 20].mean()
    return float(inner), float(ring)


def marker_at(frame: Any, x: float, y: float) -> bool:
    """A dark square ringed in white, centred at normalised (x, y), in a decoded frame."""
    inner, ring = marker_levels(frame, x, y)
    return inner < 50 and ring > 180


def test_tap_draws_a_marker_where_it_was_tapped(pipeline: Pipeline) -> None:
    async def scenario() -> tuple[dict[str, Any], bool, list[tuple[int, float, float]]]:
        # No REMB from this viewer: an estimate made on a loaded machine would lower the
        # bitrate until the marker is a blur, and the test is about input, not bandwidth.
        v = Viewer(base_url(pipeline), "dev-0", token=TOKEN, input=True, remb=False)
        await v.connect()
        try:
            first = await v.next_frame(10)
            assert first is not None
            before = marker_at(first[1], 0.3, 0.7)
            reply = await v.send_input({"type": "tap", "x": 0.3, "y": 0.7})
            # Every frame after the tap until the marker shows or 5 s pass: what was read
            # is the failure's evidence (stamp index, inner and ring luma).
            seen: list[tuple[int, float, float]] = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                got = await v.next_frame(5)
                if got is None:
                    break
                seen.append((got[0].index, *marker_levels(got[1], 0.3, 0.7)))
                if marker_at(got[1], 0.3, 0.7):
                    break
            return reply, before, seen
        finally:
            await v.close()

    reply, before, seen = asyncio.run(scenario())
    stats = ray.get(pipeline.captures["dev-0"].stats.remote())
    assert reply == {"ok": "tap"}
    assert not before
    assert seen and seen[-1][1] < 50 and seen[-1][2] > 180, (
        seen,
        encoder_stream(pipeline, "dev-0"),
    )
    assert stats["inputs"]["tap"] >= 1


@pytest.mark.parametrize(
    ("message", "mentions"),
    [
        ('{"type": "tap", "x": 1.5, "y": 0.5}', "x:"),
        ('{"type": "swipe", "x1": 0, "y1": 0, "x2": 1}', "y2:"),
        ('{"type": "key", "code": -1}', "code:"),
        ('{"type": "text", "text": ""}', "text:"),
        ('{"type": "shake"}', "type:"),
        ('{"x": 0.5}', "type:"),
        ("not json", "message:"),
        ('{"type": "tap", "x": 0.5, "y": 0.5, "force": 1}', "force:"),
    ],
)
def test_invalid_input_is_answered_and_dropped(
    pipeline: Pipeline, message: str, mentions: str
) -> None:
    before = ray.get(pipeline.captures["dev-1"].stats.remote())["inputs"]

    async def scenario() -> dict[str, Any]:
        v = Viewer(base_url(pipeline), "dev-1", token=TOKEN, input=True)
        await v.connect()
        try:
            return await v.send_input(message)
        finally:
            await v.close()

    reply = asyncio.run(scenario())
    assert set(reply) == {"error"} and reply["error"].startswith(mentions), reply
    assert ray.get(pipeline.captures["dev-1"].stats.remote())["inputs"] == before


def test_view_only_token_cannot_send_input_and_rate_is_limited(pipeline: Pipeline) -> None:
    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        viewer = Viewer(base_url(pipeline), "dev-1", token=VIEW, input=True)
        await viewer.connect()
        full = Viewer(base_url(pipeline), "dev-1", token=TOKEN, input=True)
        await full.connect()
        try:
            refused = await viewer.send_input({"type": "key", "code": 4})
            replies = [await full.send_input({"type": "key", "code": 4}) for _ in range(60)]
            return refused, replies
        finally:
            await viewer.close()
            await full.close()

    refused, replies = asyncio.run(scenario())
    assert "view-only" in refused["error"]
    limited = [r for r in replies if "error" in r]
    assert limited and all("per second" in r["error"] for r in limited)
    assert 30 <= len([r for r in replies if r.get("ok") == "key"]) < 60


# -- access -------------------------------------------------------------------------------


def _http(pipeline: Pipeline, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async def go() -> tuple[int, Any, Any]:
        async with (
            aiohttp.ClientSession(base_url(pipeline)) as http,
            http.request(method, path, **kwargs) as r,
        ):
            text = await r.text()
            return r.status, (json.loads(text) if text else None), r.headers

    return asyncio.run(go())


def test_cors_only_for_configured_origins(pipeline: Pipeline) -> None:
    auth = {"Authorization": f"Bearer {VIEW}"}
    status, _, headers = _http(pipeline, "GET", "/api/devices", headers={**auth, "Origin": ORIGIN})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    status, _, headers = _http(
        pipeline, "GET", "/api/devices", headers={**auth, "Origin": "http://evil.example"}
    )
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    status, _, headers = _http(
        pipeline,
        "OPTIONS",
        "/api/devices/v-0/sessions",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert status == 204 and "POST" in headers["Access-Control-Allow-Methods"]
    status, body, _ = _http(
        pipeline, "OPTIONS", "/api/devices", headers={"Origin": "http://evil.example"}
    )
    assert status == 403 and "cors_origins" in body["error"]


def test_view_token_may_watch(pipeline: Pipeline) -> None:
    result = asyncio.run(watch(base_url(pipeline), "dev-0", frames=5, token=VIEW))
    assert len(result.frames) == 5
    with pytest.raises(SignallingError) as info:
        asyncio.run(watch(base_url(pipeline), "dev-0", frames=1, token="nope-nope-nope"))
    assert info.value.status == 401


def test_a_vanished_viewer_is_closed_after_the_idle_timeout(pipeline: Pipeline) -> None:
    async def scenario() -> None:
        v = Viewer(base_url(pipeline), "dev-1", token=TOKEN)
        await v.connect()
        assert await v.next_frame(10) is not None
        await v.vanish()

    wait_for(lambda: resources(pipeline)["peer_connections"] == 0, 15, "no sessions")
    asyncio.run(scenario())
    assert resources(pipeline)["peer_connections"] == 1
    wait_for(lambda: resources(pipeline)["peer_connections"] == 0, 10, "the idle session closed")


def test_a_session_that_never_connects_is_closed(pipeline: Pipeline) -> None:
    async def scenario() -> None:
        v = Viewer(base_url(pipeline), "dev-1", token=TOKEN)
        await v.connect()
        await v.pc.close()  # before ICE could complete: the server never hears from it

    wait_for(lambda: resources(pipeline)["peer_connections"] == 0, 15, "no sessions")
    asyncio.run(scenario())
    wait_for(lambda: resources(pipeline)["peer_connections"] == 0, 15, "the session closed")


# -- leaks --------------------------------------------------------------------------------

CYCLES = 200
BATCH = 10
#: Ray's own gRPC threads (and their fds) come and go; a per-viewer leak would be ~100.
SLACK = {"threads": 3, "fds": 3}


def test_200_connect_disconnect_cycles_return_to_baseline(pipeline: Pipeline) -> None:
    asyncio.run(watch(base_url(pipeline), "dev-0", frames=3, token=TOKEN))
    wait_for(lambda: resources(pipeline)["peer_connections"] == 0, 15, "warm-up closed")
    baseline = resources(pipeline)

    async def cycle(i: int) -> None:
        v = Viewer(base_url(pipeline), "dev-0", token=TOKEN)
        await v.connect()
        got = await v.next_frame(10)
        assert got is not None
        if i % 2:
            await v.vanish()  # abrupt: no DELETE, no goodbye; the idle timeout cleans up
            await v.close(leave=False)
        else:
            await v.close()

    async def cycles() -> None:
        for start in range(0, CYCLES, BATCH):
            await asyncio.gather(*(cycle(i) for i in range(start, start + BATCH)))

    started = time.monotonic()
    asyncio.run(cycles())
    took = time.monotonic() - started
    last: dict[str, int] = {}

    def settled() -> dict[str, int] | None:
        last.update(resources(pipeline))
        grown = {k: v for k, v in last.items() if v > baseline.get(k, 0) + SLACK.get(k, 0)}
        return None if grown else dict(last)

    try:
        after = wait_for(settled, 30, "resources back to the baseline")
    except AssertionError:
        raise AssertionError(f"not back to baseline {baseline}: now {last}") from None
    print(f"\n{CYCLES} cycles in {took:.1f} s: baseline {baseline}, after {after}")
    assert after["peer_connections"] == 0 and after["viewers"] == 0


def test_viewer_feed_overflow_skips_to_a_keyframe() -> None:
    """The hub's part of fan-out, on plain objects: a full queue drops to the next IDR."""
    from actors.encoder import EncodedUnit
    from ingress.hub import DeviceHub

    async def scenario() -> None:
        requests: list[float] = []
        hub = DeviceHub("d", queue_size=4, request_keyframe=lambda: requests.append(1))
        slow, fast = hub.add_viewer(), hub.add_viewer()

        def unit(seq: int, key: bool) -> EncodedUnit:
            return EncodedUnit(
                "d",
                seq,
                b"\x00\x00\x00\x01" + bytes([0x65 if key else 0x41]),
                key,
                seq * 33.0,
                1.0,
                seq * 33.0 + 2,
            )

        hub.push(unit(0, True))
        for seq in range(1, 4):
            hub.push(unit(seq, False))
        for _ in range(4):
            assert (await fast.next_unit()) is not None  # the fast viewer keeps up
        assert slow.queue.full()  # 0..3 wait in the slow viewer's queue of 4
        hub.push(unit(4, False))  # overflow: drop what is queued, wait for an IDR
        assert slow.waiting_for_keyframe and slow.queue.empty()
        assert slow.skipped["slow_viewer"] == 5
        assert requests, "a keyframe was requested for the slow viewer"
        hub.push(unit(5, False))
        assert slow.queue.empty() and slow.skipped["waiting_for_keyframe"] == 1
        hub.push(unit(6, True))
        got = await slow.next_unit()
        assert got is not None and got.keyframe and got.seq == 6
        assert fast.queue.qsize() == 3  # units 4..6: the fast viewer lost nothing
        assert hub.dropped["slow_viewer"] == 5

    asyncio.run(scenario())


def test_marker_geometry_on_plain_frames() -> None:
    """The synthetic marker lands where normalised coordinates say (no Ray)."""
    import av

    from actors.synthetic import SyntheticSource

    source = SyntheticSource(width=720, height=1280)
    source.tap(0.3, 0.7)
    frame = av.VideoFrame.from_ndarray(source.next_frame().data, format="yuv420p")
    assert marker_at(frame, 0.3, 0.7) and not marker_at(frame, 0.7, 0.3)
    luma = np.asarray(frame.to_ndarray()[:1280])
    assert luma.shape == (1280, 720)

"""Viewers come and go (leaving politely, or just closing their PeerConnection): the
ingress returns to its baseline of threads, tasks, fds and PeerConnections."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import ray
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from cluster.pipeline import Pipeline
from ingress.client import watch
from tests.conftest import settings, wait_for

CYCLES = 20
#: Ray's own gRPC threads (and their fds) come and go in every worker; a leak per viewer
#: would grow by about CYCLES / 2 or more, far past this.
SLACK = {"threads": 2, "fds": 2}


@pytest.fixture(scope="module")
def pipeline(ray_local: Any) -> Iterator[Pipeline]:
    with Pipeline(settings(devices=1)) as p:
        yield p


async def _abrupt_viewer(url: str) -> None:
    """Connect, receive a little, close the PeerConnection without DELETE."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    got = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: got.done() or got.set_result(track))
    await pc.setLocalDescription(await pc.createOffer())
    async with (
        aiohttp.ClientSession(url) as http,
        http.post(
            "/api/devices/dev-0/sessions", json={"sdp": pc.localDescription.sdp, "type": "offer"}
        ) as r,
    ):
        body = await r.json()
    await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "answer"))
    track = await asyncio.wait_for(got, 10)
    await asyncio.wait_for(track.recv(), 10)
    await pc.close()


def test_connect_disconnect_cycles_leave_nothing(pipeline: Pipeline) -> None:
    assert pipeline.info is not None
    url = pipeline.info.url
    # One viewer first, so lazily created pools (aiortc's, aiohttp's) exist in the baseline.
    asyncio.run(watch(url, "dev-0", frames=5, timeout=20))
    wait_for(
        lambda: ray.get(pipeline.ingress.resources.remote())["peer_connections"] == 0,
        15,
        "the warm-up session to close",
    )
    baseline = ray.get(pipeline.ingress.resources.remote())

    async def cycles() -> None:
        for i in range(CYCLES):
            if i % 2:
                await _abrupt_viewer(url)
            else:
                result = await watch(url, "dev-0", frames=5, timeout=20)
                assert len(result.frames) == 5

    asyncio.run(cycles())

    last: dict[str, int] = {}

    def settled() -> dict[str, int] | None:
        last.update(ray.get(pipeline.ingress.resources.remote()))
        grown = {k: v for k, v in last.items() if v > baseline.get(k, 0) + SLACK.get(k, 0)}
        return None if grown else dict(last)

    try:
        after = wait_for(settled, 30, f"resources back to the baseline {baseline}")
    except AssertionError:
        raise AssertionError(f"not back to baseline {baseline}: now {last}") from None
    print(f"\nafter {CYCLES} cycles: baseline {baseline}, now {after}")

"""Failover while a real aiortc viewer watches: an encoder actor is killed, then the node
carrying the encoder is removed. Decoding resumes within 1 s each time, stamps keep
increasing, there are no decode errors, and the viewer keeps its WebRTC session.

Layout: head (driver, ingress, pool, captures; no `nvenc`), nodes B and C with
`nvenc: 2` each; two encoders (one stream each, room for two).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from actors.stamp import stamp_age_ms
from cluster.pipeline import Pipeline
from configs.schema import Settings
from ingress.client import WatchResult, watch
from tests.conftest import head_node_id, wait_for

RESUME_LIMIT_MS = 1000


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, Any]]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes = {
        "b": c.add_node(num_cpus=1, resources={"nvenc": 2}),
        "c": c.add_node(num_cpus=1, resources={"nvenc": 2}),
    }
    ray.init(address=c.address, namespace="cpm-failover")
    c.wait_for_nodes()
    settings = Settings.model_validate(
        {
            "devices": [{"id": "f-0", "fps": 30}, {"id": "f-1", "fps": 30}],
            "pool": {
                "min_workers": 2,
                "max_workers": 2,
                "streams_per_worker": 2,
                "resources": {"num_cpus": 0, "custom": {"nvenc": 1}},
            },
            "ingress": {"port": 0},
        }
    )
    pipeline = Pipeline(settings, node_id=head_node_id())
    try:
        pipeline.start()
        yield {"cluster": c, "nodes": nodes, "pipeline": pipeline}
    finally:
        pipeline.stop()
        ray.shutdown()
        c.shutdown()


def assignment(pipeline: Pipeline, device: str) -> dict[str, Any]:
    return ray.get(pipeline.pool.stats.remote(), timeout=10)["streams"][device]


def watch_while(pipeline: Pipeline, action: Callable[[], None], frames: int = 150) -> WatchResult:
    assert pipeline.info is not None

    async def scenario() -> WatchResult:
        task = asyncio.create_task(watch(pipeline.info.url, "f-0", frames=frames, timeout=40))
        await asyncio.sleep(2.0)
        assert not task.done()
        await asyncio.to_thread(action)
        return await task

    return asyncio.run(scenario())


def check_resumed(result: WatchResult) -> int:
    """The largest gap between consecutive decoded frames' capture times, in ms."""
    indices = result.indices
    assert len(indices) >= 120, f"decoded only {len(indices)} frames"
    breaks = [(a, b) for a, b in zip(indices, indices[1:], strict=False) if b < a]
    assert not breaks, f"order broken at {breaks} in {indices}"
    # About one run in three shows one stamp decoded twice, in two consecutive RTP
    # frames: the new encoder's first IDR drains its VBV (at the low bitrate the
    # viewer's REMB asked for), so x264 codes the next frame as all-skip (a unit of a
    # dozen bytes), which decodes as the picture before. Not a step back; more than one
    # would be something else, and fails.
    repeats = [
        (a.index, a.pts, b.pts)
        for a, b in zip(result.frames, result.frames[1:], strict=False)
        if b.index == a.index
    ]
    if repeats:
        print(f"\nframe decoded twice (index, pts, pts): {repeats}")
    assert len(repeats) <= 1, f"frames decoded twice (index, pts, pts): {repeats}"
    assert result.decode_errors == 0
    gaps = [
        stamp_age_ms(a.capture_ms, b.capture_ms)
        for a, b in zip(result.frames, result.frames[1:], strict=False)
    ]
    gap = max(gaps)
    assert gap <= RESUME_LIMIT_MS, f"decoding resumed after {gap} ms"
    return gap


def test_killed_encoder_fails_over_within_a_second(env: dict[str, Any]) -> None:
    pipeline: Pipeline = env["pipeline"]
    wait_for(lambda: assignment(pipeline, "f-0")["status"] == "assigned", 30, "f-0 assigned")
    before = assignment(pipeline, "f-0")
    victim = ray.get(pipeline.pool.encoder_handles.remote())[before["encoder"]]

    result = watch_while(pipeline, lambda: ray.kill(victim, no_restart=True))
    gap = check_resumed(result)
    after = assignment(pipeline, "f-0")
    assert after["encoder"] != before["encoder"] and after["moves"] == 1
    print(f"\nkill: {before['encoder']} -> {after['encoder']}, largest gap {gap} ms")


def test_removed_node_fails_over_within_a_second(env: dict[str, Any]) -> None:
    pipeline: Pipeline = env["pipeline"]
    cluster: Cluster = env["cluster"]

    def two_ready() -> bool:
        encoders = ray.get(pipeline.pool.stats.remote())["encoders"].values()
        return len([e for e in encoders if e["state"] == "ready"]) == 2

    wait_for(two_ready, 60, "the pool to replace the killed encoder")
    before = assignment(pipeline, "f-0")
    node = next(n for n in env["nodes"].values() if n.node_id == before["node_id"])

    result = watch_while(pipeline, lambda: cluster.remove_node(node, allow_graceful=False))
    gap = check_resumed(result)
    after = assignment(pipeline, "f-0")
    assert after["node_id"] != node.node_id
    print(f"\nnode removed: {before['encoder']} -> {after['encoder']}, largest gap {gap} ms")

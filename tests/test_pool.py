"""The pool on a local Ray: backend detection, a forced backend that is missing, and the
keyframe and bitrate controls reaching the right encoder (seen in what it produces)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray

from actors.encoder import StreamEncoder
from actors.hwaccel import EncoderUnavailable, detect
from cluster.pipeline import Pipeline, PipelineError
from configs.schema import DeviceConfig, EncoderConfig
from tests.conftest import settings, wait_for


def test_detection_picks_libx264_without_hardware_and_says_why() -> None:
    found = detect(EncoderConfig(hwaccel="auto"))
    assert found.backend == "libx264" and found.codec_name == "libx264"
    # The hardware backends were really tried, and each failure has a reason.
    assert set(found.failures) == {"nvenc", "qsv", "vaapi"}
    assert all(found.failures.values())


def test_forced_missing_backend_is_a_clear_error() -> None:
    with pytest.raises(EncoderUnavailable, match=r"encoder.hwaccel='nvenc' was forced"):
        detect(EncoderConfig(hwaccel="nvenc"))


@pytest.fixture(scope="module")
def pipeline(ray_local: Any) -> Iterator[Pipeline]:
    with Pipeline(
        settings(
            devices=2,
            pool={"min_workers": 2, "max_workers": 2, "streams_per_worker": 1},
            encoder={"keyframe_interval": 600, "min_bitrate_bps": 100_000},
        )
    ) as p:
        yield p


def test_forced_nvenc_stops_the_pipeline_with_the_reason(ray_local: Any) -> None:
    p = Pipeline(settings(devices=1, encoder={"hwaccel": "nvenc"}))
    with pytest.raises(PipelineError, match=r"encoder-0 failed to start.*hwaccel='nvenc'"):
        p.start()
    assert p.info is None and p.ingress is None  # everything it started is gone


def stream_stats(pipeline: Pipeline, device: str) -> dict[str, Any]:
    name = ray.get(pipeline.pool.stats.remote())["streams"][device]["encoder"]
    handle = ray.get(pipeline.pool.encoder_handles.remote())[name]
    return ray.get(handle.stats.remote())["streams"][device]


def test_each_stream_has_its_own_encoder(pipeline: Pipeline) -> None:
    streams = ray.get(pipeline.pool.stats.remote())["streams"]
    wait_for(lambda: stream_stats(pipeline, "dev-1")["frames_encoded"] > 10, 20, "frames")
    assert streams["dev-0"]["encoder"] != streams["dev-1"]["encoder"]
    assert {s["hwaccel"] for s in streams.values()} == {"libx264"}


def test_keyframe_request_reaches_only_its_stream(pipeline: Pipeline) -> None:
    wait_for(lambda: stream_stats(pipeline, "dev-0")["frames_encoded"] > 10, 20, "frames")
    before = {d: stream_stats(pipeline, d)["keyframes"] for d in ("dev-0", "dev-1")}
    assert ray.get(pipeline.pool.request_keyframe.remote("dev-1")) is True
    wait_for(
        lambda: stream_stats(pipeline, "dev-1")["keyframes"] == before["dev-1"] + 1,
        10,
        "one more IDR on dev-1",
    )
    assert stream_stats(pipeline, "dev-0")["keyframes"] == before["dev-0"]
    assert ray.get(pipeline.pool.request_keyframe.remote("nope")) is False


def test_bitrate_change_is_clamped_and_seen_in_the_output(pipeline: Pipeline) -> None:
    def bytes_per_frame(device: str, frames: int = 45) -> float:
        start = stream_stats(pipeline, device)
        wait_for(
            lambda: (
                stream_stats(pipeline, device)["frames_encoded"] >= start["frames_encoded"] + frames
            ),
            20,
            f"{frames} frames",
        )
        end = stream_stats(pipeline, device)
        return (end["bytes_out"] - start["bytes_out"]) / (
            end["frames_encoded"] - start["frames_encoded"]
        )

    def wait_for_reopens(n: int) -> dict[str, Any]:
        wait_for(lambda: stream_stats(pipeline, "dev-1")["bitrate_reopens"] == n, 10, f"reopen {n}")
        return stream_stats(pipeline, "dev-1")

    # Skip the first keyframe's weight, then measure dev-1 at the default bitrate.
    bytes_per_frame("dev-1", 10)
    high = bytes_per_frame("dev-1")
    before = stream_stats(pipeline, "dev-1")
    # Far below the rate it was opened for: a new encoder at the new rate, from an IDR.
    assert ray.get(pipeline.pool.set_bitrate.remote("dev-1", 10)) == 100_000  # clamped
    lowered = wait_for_reopens(1)
    bytes_per_frame("dev-1", 15)  # past the IDR that starts the new rate
    low = bytes_per_frame("dev-1")
    assert lowered["bitrate_bps"] == 100_000
    assert lowered["keyframes"] > before["keyframes"], (before, lowered)
    assert low < 0.7 * high, (high, low)
    assert stream_stats(pipeline, "dev-0")["bitrate_changes"] == 0
    # Above it: a new encoder again, with room to rise further in place.
    assert ray.get(pipeline.pool.set_bitrate.remote("dev-1", 180_000)) == 180_000
    raised = wait_for_reopens(2)
    # Within twice its VBV ceiling: in place, no new encoder and no IDR (beyond the GOP's
    # own, one per 600 frames).
    assert ray.get(pipeline.pool.set_bitrate.remote("dev-1", 300_000)) == 300_000
    wait_for(lambda: stream_stats(pipeline, "dev-1")["bitrate_bps"] == 300_000, 10, "300 kbps")
    bytes_per_frame("dev-1", 30)
    in_place = stream_stats(pipeline, "dev-1")
    periodic = in_place["frames_in"] // 600 - raised["frames_in"] // 600
    assert in_place["bitrate_reopens"] == 2, in_place
    assert in_place["keyframes"] == raised["keyframes"] + periodic, (raised, in_place)
    assert ray.get(pipeline.pool.set_bitrate.remote("dev-1", 10**9)) == 8_000_000  # clamped
    assert wait_for_reopens(3)["bitrate_bps"] == 8_000_000


def test_libx264_follows_a_lower_target_in_place() -> None:
    """Without Ray: content that needs more than the target gets less, with no new IDR."""
    device = DeviceConfig(id="noise", width=320, height=240, fps=30)
    config = EncoderConfig(bitrate_bps=2_000_000, keyframe_interval=600)
    stream = StreamEncoder(device, config, "libx264")
    noise = np.random.default_rng(0).integers(0, 256, (360, 320), dtype=np.uint8)

    def kbps(frames: int) -> float:
        start = stream.stats.bytes_out
        for i in range(frames):
            stream.encode(np.roll(noise, 3 * i, axis=1), time.time() * 1000)
        return (stream.stats.bytes_out - start) * 8 * 30 / frames / 1000

    kbps(30)
    high = kbps(60)
    assert stream.set_bitrate(1_200_000) == 1_200_000
    kbps(30)
    low = kbps(60)
    assert stream.stats.bitrate_reopens == 0 and stream.stats.keyframes == 1
    assert low < 0.75 * high and 900 < low < 1500, (high, low)


def test_a_busy_encoder_answers_the_pools_ping(ray_local: Any) -> None:
    """The ping runs on the actor's control thread, not behind queued frames: an encoder
    that is slow (a loaded machine, many streams) is not taken for a dead one."""
    from actors.encoder import CONTROL_GROUP, create_encoder_actor
    from actors.synthetic import SyntheticSource
    from configs.schema import ActorResources

    actor = create_encoder_actor(99, encoder=EncoderConfig(), resources=ActorResources(num_cpus=0))
    try:
        device = DeviceConfig(id="busy", width=720, height=1280, fps=30)
        ray.get(actor.open_stream.remote(device))
        frame = ray.put(SyntheticSource(width=720, height=1280).next_frame().data)
        future_ms = time.time() * 1000 + 60_000  # never stale while it waits
        frames = [actor.encode.remote("busy", frame, i, future_ms + i) for i in range(40)]
        ping = actor.ping.options(concurrency_group=CONTROL_GROUP).remote()
        answer = ray.get(ping, timeout=30)
        _, still_queued = ray.wait(frames, num_returns=len(frames), timeout=0)
        assert answer["name"] == "encoder-99" and answer["busy_s"] >= 0
        assert still_queued, "the ping waited for every queued frame"
        ray.get(frames, timeout=60)
    finally:
        ray.kill(actor)

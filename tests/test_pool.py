"""The pool on a local Ray: backend detection, a forced backend that is missing, and the
keyframe and bitrate controls reaching the right encoder (seen in what it produces)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import ray

from actors.hwaccel import EncoderUnavailable, detect
from cluster.pipeline import Pipeline, PipelineError
from configs.schema import EncoderConfig
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
    p = Pipeline(
        settings(
            devices=2,
            pool={"min_workers": 2, "max_workers": 2, "streams_per_worker": 1},
            encoder={"keyframe_interval": 600, "min_bitrate_bps": 100_000},
        )
    )
    try:
        p.start()
        yield p
    finally:
        p.stop()


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

    # Skip the first keyframe's weight, then measure dev-1 at the default bitrate.
    bytes_per_frame("dev-1", 10)
    high = bytes_per_frame("dev-1")
    assert ray.get(pipeline.pool.set_bitrate.remote("dev-1", 10)) == 100_000  # clamped
    wait_for(lambda: stream_stats(pipeline, "dev-1")["bitrate_changes"] == 1, 10, "the new bitrate")
    bytes_per_frame("dev-1", 15)  # past the IDR that starts the new rate
    low = bytes_per_frame("dev-1")
    assert stream_stats(pipeline, "dev-1")["bitrate_bps"] == 100_000
    assert low < 0.7 * high, (high, low)
    assert stream_stats(pipeline, "dev-0")["bitrate_changes"] == 0
    assert ray.get(pipeline.pool.set_bitrate.remote("dev-1", 10**9)) == 8_000_000

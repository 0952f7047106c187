"""ADB and media capture, driven by a scripted `adb` STAND-IN (tests/fake_adb.py): no
Android device is reachable from these machines. The stand-in replays a real H.264
stream and real raw screencap frames made here with PyAV, and can go offline or end its
stream early (as screenrecord does at its time limit)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from actors.sources import parse_screencap
from actors.stamp import read_stamp
from cluster.pipeline import Pipeline
from configs.schema import Settings
from ingress.client import Viewer, watch
from tests.conftest import REPLAYED, base_url, wait_for


def make_settings(fake: Path, *devices: dict[str, Any]) -> Settings:
    return Settings.model_validate(
        {
            "devices": list(devices),
            "pool": {"min_workers": 1, "max_workers": 1, "streams_per_worker": 4},
            "ingress": {"port": 0},
        }
    )


@pytest.fixture(scope="module")
def pipeline(ray_local: Any, fake: Path) -> Iterator[Pipeline]:
    adb = str(fake / "adb")
    with Pipeline(
        make_settings(
            fake,
            {
                "id": "rec",
                "fps": 30,
                "source": {"kind": "adb-screenrecord", "serial": "fake-1", "adb_path": adb},
            },
            {
                "id": "trans",
                "width": 576,
                "height": 1024,
                "fps": 30,
                "source": {
                    "kind": "adb-screenrecord",
                    "serial": "fake-2",
                    "adb_path": adb,
                    "mode": "transcode",
                },
            },
            {
                "id": "cap",
                "width": 540,
                "height": 960,
                "fps": 15,
                "source": {"kind": "adb-screencap", "serial": "10.0.0.9:5555", "adb_path": adb},
            },
        )  # fmt: skip
    ) as p:
        yield p


def capture_stats(p: Pipeline, device: str) -> dict[str, Any]:
    return ray.get(p.captures[device].stats.remote())


def in_order(indices: list[int]) -> bool:
    """Never backwards, allowing the replayed stream's wrap from its end to its start.
    A stamp may repeat: an all-skip frame from an encoder short of bits (README)."""
    breaks = [(a, b) for a, b in zip(indices, indices[1:], strict=False) if b < a]
    return all(a >= REPLAYED - 30 and b < 30 for a, b in breaks)


def test_passthrough_survives_screenrecord_restarts(pipeline: Pipeline) -> None:
    result = asyncio.run(watch(base_url(pipeline), "rec", frames=150, timeout=30))
    assert len(result.frames) == 150 and result.decode_errors == 0
    idx = result.indices
    assert in_order(idx), [(a, b) for a, b in zip(idx, idx[1:], strict=False) if b <= a]
    assert {(f.width, f.height) for f in result.frames} == {(720, 1280)}
    stats = capture_stats(pipeline, "rec")
    # 60 units a run: 150 frames cross at least two restarts, in one session.
    assert stats["restarts"] >= 2 and stats["restart_gaps_ms"]
    devices = ray.get(pipeline.ingress.stats.remote())["devices"]
    rec = devices["rec"]
    assert rec["hwaccel"] == "device" and rec["frames_dropped"] == 0, rec["dropped"]
    print(f"\nscreenrecord restart gaps: {stats['restart_gaps_ms']} ms")


def watch_scaled(
    p: Pipeline, device: str, frames: int
) -> tuple[set[tuple[int, int]], list[int], int]:
    """Frame sizes, stamps and decode errors of a device scaled from the 720x1280 source:
    the stamp is fixed in source pixels, so each frame is scaled back before reading."""

    async def scenario() -> tuple[set[tuple[int, int]], list[int], int]:
        viewer = Viewer(base_url(p), device)
        await viewer.connect()
        sizes, indices = set(), []
        try:
            for _ in range(frames):
                got = await viewer.next_frame(10)
                assert got is not None
                frame = got[1]
                sizes.add((frame.width, frame.height))
                full = frame.reformat(width=720, height=1280, format="gray").to_ndarray()
                indices.append(read_stamp(full)[0])
        finally:
            await viewer.close()
        return sizes, indices, viewer.decode_errors.count

    return asyncio.run(scenario())


def test_transcode_gives_the_configured_size_in_order(pipeline: Pipeline) -> None:
    sizes, indices, errors = watch_scaled(pipeline, "trans", 90)
    assert sizes == {(576, 1024)} and errors == 0
    assert in_order(indices), indices


def test_screencap_gives_the_configured_size_in_order(pipeline: Pipeline) -> None:
    sizes, indices, errors = watch_scaled(pipeline, "cap", 30)
    assert sizes == {(540, 960)} and errors == 0
    assert in_order(indices), indices
    # A network device (host:port): `adb connect` was run first, and it is live.
    assert capture_stats(pipeline, "cap")["status"] == "live"


def test_tap_becomes_adb_shell_input(pipeline: Pipeline, fake: Path) -> None:
    assert ray.get(
        pipeline.captures["cap"].handle_input.remote({"type": "tap", "x": 0.5, "y": 0.25})
    )
    log = fake / "input.log"
    wait_for(lambda: log.exists() and log.read_text().strip(), 10, "the input call")
    assert json.loads(log.read_text().splitlines()[-1]) == ["input", "tap", "270", "240"]


def test_offline_and_back(pipeline: Pipeline, fake: Path) -> None:
    def status() -> str:
        return str({d["id"]: d for d in _devices(pipeline)}["cap"]["status"])

    (fake / "state").write_text("offline")
    try:
        wait_for(lambda: status() == "offline", 20, "cap offline in /api/devices")
        assert "not found" in capture_stats(pipeline, "cap")["offline_reason"]
    finally:
        (fake / "state").write_text("device")
    wait_for(lambda: status() == "live", 40, "cap live again")


def _devices(p: Pipeline) -> list[dict[str, Any]]:
    import urllib.request

    with urllib.request.urlopen(base_url(p) + "api/devices", timeout=10) as r:
        return list(json.loads(r.read()))


@pytest.mark.parametrize(
    ("header", "fmt", "bpp"), [(12, 1, 4), (16, 1, 4), (12, 2, 4), (16, 4, 2), (12, 3, 3)]
)
def test_screencap_headers_and_formats(header: int, fmt: int, bpp: int) -> None:
    width, height = 8, 4
    head = np.array([width, height, fmt, 0][: header // 4], dtype="<u4").tobytes()
    pixels = bytes(range(256)) * (width * height * bpp // 256 + 1)
    pixels = pixels[: width * height * bpp]
    array, pix_fmt, w, h = parse_screencap(head + pixels)
    assert (w, h) == (width, height)
    assert pix_fmt == {1: "rgba", 2: "rgba", 3: "rgb24", 4: "rgb565le"}[fmt]
    assert array.tobytes() == pixels


def test_screencap_garbage_is_refused() -> None:
    with pytest.raises(ValueError, match="shorter than its header"):
        parse_screencap(b"\x00" * 5)
    bad = np.array([8, 4, 99], dtype="<u4").tobytes() + b"\x00" * 128
    with pytest.raises(ValueError, match="format 99"):
        parse_screencap(bad)
    short = np.array([8, 4, 1], dtype="<u4").tobytes() + b"\x00" * 10
    with pytest.raises(ValueError, match="do not match"):
        parse_screencap(short)


def test_rgb565_converts_on_the_encoder() -> None:
    from actors.encoder import rgb565_to_rgb24

    white_red = np.array([[0xFFFF, 0xF800]], dtype="<u2")
    rgb = rgb565_to_rgb24(white_red)
    assert rgb.tolist() == [[[255, 255, 255], [255, 0, 0]]]
    assert os.environ.get("FAKE_ADB_DIR") is None  # the stand-in is never configured globally


def test_every_screenrecord_idr_goes_out_with_sps_and_pps(fake: Path) -> None:
    """A device sends SPS/PPS once per run, before its first IDR (the stand-in too); the
    feed puts them before every later IDR, so a decoder can start at any of them (a
    passthrough viewer joining late, a transcoder after a failover)."""
    import av

    from actors.sources import ScreenrecordFeed, nal_units
    from configs.schema import DeviceConfig

    device = DeviceConfig.model_validate(
        {
            "id": "sets",
            "source": {"kind": "adb-screenrecord", "serial": "sets", "adb_path": str(fake / "adb")},
        }
    )
    feed = ScreenrecordFeed(device)

    async def one_run() -> list[Any]:
        try:
            return [unit async for unit in feed.frames()]
        finally:
            await feed.close()

    units = asyncio.run(one_run())
    keyframes = [i for i, unit in enumerate(units) if unit.keyframe]
    assert len(units) == 60 and keyframes == [0, 30], keyframes
    assert feed.parameter_sets_added == 1  # the device left them out of the second IDR
    for i in keyframes:
        assert {7, 8, 5} <= {kind for kind, _, _ in nal_units(units[i].data)}
    decoder = av.CodecContext.create("h264", "r")
    stamps = []
    for unit in units[30:]:  # a fresh decoder, starting at the second IDR
        for frame in decoder.decode(av.Packet(unit.data)):
            stamps.append(read_stamp(frame.to_ndarray(format="gray"))[0])
    assert len(stamps) >= 29 and stamps == sorted(stamps), stamps


def test_a_transcoder_taking_over_mid_gop_is_primed(pipeline: Pipeline) -> None:
    """Kill the transcoding encoder: its successor first decodes the device's units
    since the last IDR (sent by the capture actor), so it fails on none of the units
    that follow, and the viewer sees the stream again."""

    def trans() -> tuple[str | None, dict[str, Any]]:
        name = ray.get(pipeline.pool.stats.remote())["streams"]["trans"]["encoder"]
        if name is None:
            return None, {}
        handle = ray.get(pipeline.pool.encoder_handles.remote())[name]
        return name, ray.get(handle.stats.remote())["streams"].get("trans", {})

    old, _ = trans()
    ray.kill(ray.get(pipeline.pool.encoder_handles.remote())[old])

    def taken_over() -> bool:
        name, stats = trans()
        return name not in (None, old) and stats.get("frames_encoded", 0) > 45

    wait_for(taken_over, 60, "a new encoder carrying trans")
    _, stats = trans()
    assert stats["primed"] >= 1, stats
    assert "decode_error" not in stats["dropped"], stats
    sizes, indices, errors = watch_scaled(pipeline, "trans", 30)
    assert sizes == {(576, 1024)} and errors == 0 and in_order(indices), indices

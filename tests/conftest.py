"""Shared fixtures: one local Ray per test module, free ports, polling with a deadline."""

from __future__ import annotations

import json
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """A local Ray for this module (2-core machines: start once, shut down after)."""
    import ray

    context = ray.init(num_cpus=4, include_dashboard=False, namespace="cpm-tests")
    try:
        yield context
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def head_node_id() -> str:
    """The head node's id in a `ray.cluster_utils.Cluster` (every node has one IP there,
    so the driver may be attached to any of them)."""
    import ray

    return str(
        next(
            n["NodeID"]
            for n in ray.nodes()
            if n["Alive"] and "node:__internal_head__" in n["Resources"]
        )
    )


def base_url(pipeline: Any) -> str:
    """The viewer URL of a started pipeline."""
    assert pipeline.info is not None
    return str(pipeline.info.url)


def settings(devices: int = 1, **sections: dict[str, Any]) -> Any:
    """Settings for `devices` synthetic 720x1280 devices, ingress on a free port."""
    from configs.schema import Settings

    data: dict[str, Any] = {
        "devices": [{"id": f"dev-{i}", "fps": 30} for i in range(devices)],
        "pool": {"min_workers": 1, "streams_per_worker": 8},
        "ingress": {"port": 0},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return Settings(**data)


#: Frames in the replayed H.264 stream and screencap set (the ADB stand-in loops them).
REPLAYED = 300
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in's folder: its data, its state, and an `adb` wrapper that runs it."""
    import av
    import numpy as np

    from actors.encoder import StreamEncoder
    from actors.sources import nal_units
    from actors.synthetic import SyntheticSource
    from configs.schema import DeviceConfig, EncoderConfig

    folder = tmp_path_factory.mktemp("fake-adb")
    # A real H.264 stream: 300 stamped synthetic frames, an IDR every 30.
    device = DeviceConfig(id="phone", width=720, height=1280)
    encoder = StreamEncoder(device, EncoderConfig(keyframe_interval=30), "libx264")
    source = SyntheticSource(width=720, height=1280)
    # Each unit also without SPS/PPS: a device sends those once per run (see fake_adb).
    stream, units, bare, bare_units = bytearray(), [], bytearray(), []
    for i in range(REPLAYED):
        frame = source.frame_at(i, 1_000_000 + i * 33)
        for payload, _key, _ms in encoder.encode(frame.data, frame.capture_ms):
            units.append((len(stream), len(payload)))
            stream += payload
            nals = nal_units(payload)
            stripped = b"".join(payload[s:e] for kind, s, e in nals if kind not in (7, 8))
            bare_units.append((len(bare), len(stripped)))
            bare += stripped
    (folder / "stream.h264").write_bytes(bytes(stream))
    (folder / "units.json").write_text(json.dumps(units))
    (folder / "bare.h264").write_bytes(bytes(bare))
    (folder / "bare_units.json").write_text(json.dumps(bare_units))
    (folder / "frames_per_run").write_text("60")
    # Real raw screencap frames: RGBA with Android 12's 16-byte header.
    shots = folder / "screencap"
    shots.mkdir()
    for i in range(REPLAYED):
        yuv = av.VideoFrame.from_ndarray(source.frame_at(i, 2_000_000 + i * 66).data, "yuv420p")
        rgba = yuv.to_ndarray(format="rgba")
        header = np.array([720, 1280, 1, 0], dtype="<u4").tobytes()
        (shots / f"{i:04d}.raw").write_bytes(header + rgba.tobytes())
    wrapper = folder / "adb"
    wrapper.write_text(
        f'#!/bin/sh\nFAKE_ADB_DIR="{folder}" exec "{sys.executable}" '
        f'"{ROOT / "tests" / "fake_adb.py"}" "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return folder

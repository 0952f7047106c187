"""ADB and media capture with pipelines of their own (each needs the actor names free):
no adb process outlives its pipeline; a media file plays, looping. The `adb` here is the
scripted STAND-IN of tests/fake_adb.py (no Android device is reachable)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import av
import psutil
import ray

from actors.synthetic import SyntheticSource
from cluster.pipeline import Pipeline
from ingress.client import watch
from tests.conftest import base_url, wait_for
from tests.test_adb import make_settings


def test_no_adb_process_outlives_the_pipeline(ray_local: Any, fake: Path) -> None:
    """Runs its own pipeline: every adb it started is gone once it stops."""
    (fake / "pids").write_text("")
    adb = str(fake / "adb")
    p = Pipeline(
        make_settings(
            fake,
            {"id": "rec2", "source": {"kind": "adb-screenrecord", "serial": "f", "adb_path": adb}},
            {
                "id": "cap2",
                "width": 540,
                "height": 960,
                "fps": 10,
                "source": {"kind": "adb-screencap", "serial": "g", "adb_path": adb},
            },
        )  # fmt: skip
    )
    try:
        p.start()
        wait_for(lambda: len((fake / "pids").read_text().split()) >= 5, 20, "adb calls")
    finally:
        p.stop()
    pids = [int(x) for x in (fake / "pids").read_text().split()]

    def gone() -> bool:
        for pid in pids:
            if psutil.pid_exists(pid):
                try:
                    if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                        return False
                except psutil.NoSuchProcess:
                    continue
                return False  # a zombie: nobody reaped it
        return True

    wait_for(gone, 10, f"none of {len(pids)} adb processes left")


def test_media_file_plays_looping(ray_local: Any, tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    source = SyntheticSource(width=720, height=1280)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 720, 1280, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(45):
            frame = av.VideoFrame.from_ndarray(source.frame_at(i, i).data, format="yuv420p")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    p = Pipeline(
        make_settings(
            tmp_path,
            {
                "id": "clip",
                "width": 540,
                "height": 960,
                "fps": 30,
                "source": {"kind": "media", "url": str(path)},
            },
        )  # fmt: skip
    )
    try:
        p.start()
        result = asyncio.run(watch(base_url(p), "clip", frames=100, timeout=30))
        stats = ray.get(p.captures["clip"].stats.remote())
    finally:
        p.stop()
    assert len(result.frames) == 100 and result.decode_errors == 0
    assert {(f.width, f.height) for f in result.frames} == {(540, 960)}
    assert stats["loops"] >= 2  # 45 frames a pass: 100 frames need three passes
    # Within one pass the file's own stamps rise; a loop starts again at 0.
    assert 0 in result.indices[1:]

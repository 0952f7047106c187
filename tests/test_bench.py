"""A short bench run gives a complete, self-consistent report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.bench import (
    baseline_fps,
    bench_settings,
    meets_targets,
    pipeline_throughput,
    plot,
    run_bench,
)


def test_short_bench_report_is_consistent(ray_local: Any, tmp_path: Path) -> None:
    report = run_bench(
        bench_settings(2, fps=30, width=720, height=1280, workers=1), seconds=4, warmup=1
    )
    json.dumps(report)  # serialisable as the CLI writes it
    assert report["devices_n"] == 2 and set(report["devices"]) == {"bench-0", "bench-1"}
    for device_id, d in report["devices"].items():
        assert 0 < d["frames_received"] <= d["frames_captured"], (device_id, d)
        assert d["in_order"] and d["decode_errors"] == 0, (device_id, d)
        lat = d["capture_to_decoded_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"], lat
        assert d["pipeline_ms"]["p50"] <= d["pipeline_ms"]["p99"]
        assert 0 <= d["dropped_pct"] <= 100
        assert d["fps"] > 10
    cpu = report["cpu_percent_of_one_core"]
    assert cpu["ray::EncoderActor"] > 0 and cpu["ray::CaptureActor"] > 0, cpu
    total = report["total"]["capture_to_decoded_ms"]
    assert total["p50"] <= total["p95"] <= total["p99"]
    assert isinstance(meets_targets(report), bool)
    png = tmp_path / "bench.png"
    assert plot(report, png) and png.read_bytes()[:4] == b"\x89PNG"


def test_efficiency_inputs_are_measured(ray_local: Any) -> None:
    base = baseline_fps(width=720, height=1280, seconds=2, processes=1)
    piped = pipeline_throughput(
        bench_settings(1, fps=30, width=720, height=1280, workers=1), seconds=2, warmup=1
    )
    # Plain PyAV encodes ultrafast 720x1280 far above 30 fps; the pipeline, fed at
    # 120 fps, encodes more than its devices' nominal 30 fps and no more than offered.
    assert base > 60, base
    assert 30 < piped <= 125, piped

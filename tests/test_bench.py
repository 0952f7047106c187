"""A short bench run gives a complete, self-consistent report."""

from __future__ import annotations

import json
from typing import Any

from cluster.bench import bench_settings, run_bench


def test_short_bench_report_is_consistent(ray_local: Any) -> None:
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

"""Metrics on Ray's Prometheus endpoint, the leak monitor, and the status command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from actors.stats import process_resources
from cluster.pipeline import Pipeline
from tests.conftest import free_port, settings, wait_for

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "cpm-monitoring"


@pytest.fixture(scope="module")
def metrics_port() -> Iterator[int]:
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, namespace=NAMESPACE, _metrics_export_port=port)
    try:
        yield port
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def pipeline(metrics_port: int) -> Iterator[Pipeline]:
    with Pipeline(settings(devices=2, monitor={"interval_s": 0.5, "growth_percent": 50})) as p:
        yield p


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def metric_sum(text: str, name: str, **tags: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(labels.get(k) == v for k, v in tags.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_shows_the_counts_of_a_device(pipeline: Pipeline, metrics_port: int) -> None:
    capture = pipeline.captures["dev-0"]
    wait_for(lambda: ray.get(capture.stats.remote())["frames_encoded"] >= 30, 20, "30 frames")
    ray.get(capture.stop.remote())  # freeze the counts, then compare
    stats = ray.get(capture.stats.remote())
    encoder = ray.get(pipeline.encoders[0].stats.remote())["streams"]["dev-0"]
    captured, encoded = stats["frames_captured"], encoder["frames_encoded"]
    dropped = sum(stats["dropped"].values())

    def exported() -> tuple[float, float, float] | None:
        text = scrape(metrics_port)
        got = (
            metric_sum(text, "ray_cpm_frames_captured_total", device="dev-0"),
            metric_sum(text, "ray_cpm_frames_encoded_total", device="dev-0"),
            metric_sum(text, "ray_cpm_frames_dropped_total", device="dev-0", stage="capture"),
        )
        return got if got == (captured, encoded, dropped) else None

    wait_for(exported, 45, f"captured={captured} encoded={encoded} dropped={dropped} exported")
    text = scrape(metrics_port)
    assert metric_sum(text, "ray_cpm_encode_latency_ms_count", device="dev-0") == encoded
    assert "ray_cpm_pool_capacity_streams" in text


def test_leak_monitor_is_quiet_in_a_steady_run(pipeline: Pipeline) -> None:
    def sampled() -> dict[str, Any] | None:
        sample = ray.get(pipeline.monitor.last_sample.remote())
        return sample if sample.get("samples", 0) >= 8 else None

    sample = wait_for(sampled, 30, "8 monitor samples")
    assert sample["suspects"] == [], sample["suspects"]
    assert {"ingress", "encoder-0", "capture:dev-1", "cluster"} <= set(sample["values"])
    assert sample["values"]["cluster"]["actors.CaptureActor"] == 2
    stats = ray.get(pipeline.ingress.stats.remote())
    assert stats["monitor"]["samples"] >= 8  # /api/stats carries the last sample


@ray.remote(num_cpus=0)
class FdLeaker:
    """A test actor that really leaks file descriptors, answering like our actors do."""

    def __init__(self) -> None:
        self.files: list[int] = []

    def leak(self, count: int) -> int:
        self.files += [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
        return len(self.files)

    def release(self) -> None:
        for fd in self.files:
            os.close(fd)
        self.files = []

    def resources(self) -> dict[str, int]:
        return process_resources()


def test_leak_monitor_warns_on_an_injected_leak(pipeline: Pipeline) -> None:
    leaker = FdLeaker.remote()  # type: ignore[attr-defined]
    ray.get(pipeline.monitor.watch_actor.remote("leaker", leaker))

    def has_baseline() -> bool:
        sample = ray.get(pipeline.monitor.last_sample.remote())
        return "leaker" in sample.get("baseline", {})

    wait_for(has_baseline, 10, "a baseline for the leaker")
    ray.get(leaker.leak.remote(200))

    def suspected() -> list[dict[str, Any]]:
        suspects = ray.get(pipeline.monitor.last_sample.remote())["suspects"]
        return [s for s in suspects if s["actor"] == "leaker" and s["resource"] == "fds"]

    found = wait_for(suspected, 10, "the fd leak to be reported")[0]
    assert found["value"] - found["baseline"] >= 200
    ray.get(leaker.release.remote())
    wait_for(lambda: not suspected(), 10, "the warning to clear after release")
    ray.get(pipeline.monitor.unwatch.remote("leaker"))
    ray.kill(leaker)


def status(*args: str) -> subprocess.CompletedProcess[str]:
    address = ray.get_runtime_context().gcs_address
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "status", "--address", address, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_status_prints_every_device(pipeline: Pipeline) -> None:
    done = status("--namespace", NAMESPACE)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "STATUS", "FPS"]
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert set(rows) == {"dev-0", "dev-1"}
    assert rows["dev-1"][1] == "live" and "libx264" in rows["dev-1"]
    assert "2 devices" in done.stdout


def test_status_without_a_pipeline_says_so(pipeline: Pipeline) -> None:
    done = status("--namespace", "nothing-here")
    assert done.returncode == 1
    assert "no running pipeline" in done.stderr

"""The pipeline's metrics, on Ray's Prometheus endpoint (`ray.util.metrics`).

Each process creates the metric objects once, on first use; outside Ray (plain-class
tests) every call is a no-op. Ray exports them with a `ray_` prefix, e.g.
`ray_cpm_frames_captured_total{device="phone-1"}`. Names and tags:

| metric | kind | tags |
| --- | --- | --- |
| cpm_frames_captured | counter | device |
| cpm_frames_encoded | counter | device, encoder, hwaccel |
| cpm_frames_dropped | counter | device, stage (capture, encoder, ingress), reason |
| cpm_encode_latency_ms | histogram | device, hwaccel |
| cpm_capture_to_send_ms | histogram | device |
| cpm_viewers | gauge | device |
| cpm_bitrate_bps | gauge | device |
| cpm_pool_capacity_streams | gauge | - |
| cpm_pool_streams | gauge | - |
| cpm_pool_pending_streams | gauge | - |
| cpm_leak_suspected | gauge | actor, resource |
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

LATENCY_BOUNDARIES_MS: list[float] = [
    1,
    2,
    3,
    5,
    8,
    12,
    16,
    20,
    25,
    33,
    50,
    75,
    100,
    150,
    250,
    500,
    1000,
]

_SPECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "frames_captured": ("counter", "Frames captured", ("device",)),
    "frames_encoded": ("counter", "Access units encoded", ("device", "encoder", "hwaccel")),
    "frames_dropped": (
        "counter",
        "Frames dropped, by stage and reason",
        ("device", "stage", "reason"),
    ),
    "encode_latency_ms": ("histogram", "Encode time per frame (ms)", ("device", "hwaccel")),
    "capture_to_send_ms": ("histogram", "Capture to packet handed to WebRTC (ms)", ("device",)),
    "viewers": ("gauge", "Connected viewers", ("device",)),
    "bitrate_bps": ("gauge", "Encoded bitrate arriving at the ingress", ("device",)),
    "pool_capacity_streams": ("gauge", "Streams the encoder pool can carry", ()),
    "pool_streams": ("gauge", "Streams placed on encoders", ()),
    "pool_pending_streams": ("gauge", "Streams waiting for encoder capacity", ()),
    "leak_suspected": (
        "gauge",
        "1 while a resource grows past its baseline",
        ("actor", "resource"),
    ),
}

_metrics: dict[str, Any] = {}
_disabled = False


def _get(name: str) -> Any | None:
    global _disabled
    if _disabled:
        return None
    metric = _metrics.get(name)
    if metric is not None:
        return metric
    try:
        import ray
        from ray.util import metrics

        if not ray.is_initialized():
            return None
        kind, description, tags = _SPECS[name]
        full = f"cpm_{name}"
        if kind == "counter":
            metric = metrics.Counter(full, description=description, tag_keys=tags)
        elif kind == "gauge":
            metric = metrics.Gauge(full, description=description, tag_keys=tags)
        else:
            metric = metrics.Histogram(
                full, description=description, boundaries=LATENCY_BOUNDARIES_MS, tag_keys=tags
            )
    except Exception:  # noqa: BLE001 - metrics must never break the pipeline
        logger.exception("metrics unavailable in this process")
        _disabled = True
        return None
    _metrics[name] = metric
    return metric


def inc(name: str, value: float = 1.0, **tags: str) -> None:
    metric = _get(name)
    if metric is not None and value > 0:
        metric.inc(value, tags=tags)


def observe(name: str, value: float, **tags: str) -> None:
    metric = _get(name)
    if metric is not None:
        metric.observe(value, tags=tags)


def set_gauge(name: str, value: float, **tags: str) -> None:
    metric = _get(name)
    if metric is not None:
        metric.set(value, tags=tags)

"""`cloudphone-media bench`: N synthetic devices through the whole pipeline, measured.

Runs in the driver process: starts (or joins) Ray, places a pipeline of N synthetic
devices, attaches one real aiortc viewer per device (ingress/client.py, decoding every
frame) for T seconds, and reports per device and in total: fps seen by the viewer,
dropped %, capture-to-decoded latency p50/p95/p99 from the stamps, pipeline latency
(capture to the packet handed to WebRTC) from the ingress, encode time, and CPU per role
(processes of this node, by actor class). The viewer's latency includes aiortc's jitter
buffer, which holds each frame until the next frame's first packet (one frame interval).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from actors.stats import percentile
from configs.schema import Settings

ROLE_PREFIX = "ray::"


def bench_settings(devices: int, *, fps: int, width: int, height: int, workers: int) -> Settings:
    return Settings.model_validate(
        {
            "devices": [
                {"id": f"bench-{i}", "width": width, "height": height, "fps": fps}
                for i in range(devices)
            ],
            "pool": {
                "min_workers": workers,
                "max_workers": workers,
                "streams_per_worker": max(1, -(-devices // workers)),
            },
            "ingress": {"port": 0},
        }
    )


def _role(cmdline: list[str]) -> str | None:
    text = " ".join(cmdline)
    if text.startswith(ROLE_PREFIX):
        return ROLE_PREFIX + text[len(ROLE_PREFIX) :].split()[0].split(".")[0]
    for name in ("raylet", "gcs_server", "dashboard.py", "agent.py"):
        if name in text:
            return name
    return None


class CpuSampler:
    """CPU seconds per role between `start` and `stop`, for this node's processes."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._start: dict[int, tuple[str, float]] = {}

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        out = {}
        me = os.getpid()
        for proc in self._psutil.process_iter(["pid", "cmdline"]):
            try:
                role = "client+driver" if proc.pid == me else _role(proc.info["cmdline"] or [])
                if role is None:
                    continue
                times = proc.cpu_times()
                out[proc.pid] = (role, times.user + times.system)
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
        return out

    def start(self) -> None:
        self._start = self._snapshot()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Percent of one core per role over the interval."""
        end = self._snapshot()
        span = time.monotonic() - self._t0
        roles: dict[str, float] = {}
        for pid, (role, cpu) in end.items():
            before = self._start.get(pid, (role, cpu))[1] if pid in self._start else 0.0
            roles[role] = roles.get(role, 0.0) + (cpu - before)
        return {role: round(100 * cpu / span, 1) for role, cpu in sorted(roles.items())}


async def _watch_all(
    url: str, device_ids: list[str], seconds: float, viewers: int = 1
) -> list[Any]:
    """One aiortc viewer per device (more with `viewers`), each decoding every frame."""
    from ingress.client import watch

    tasks = [
        asyncio.create_task(watch(url, d, frames=10**9, timeout=seconds))
        for _ in range(viewers)
        for d in device_ids
    ]
    started = time.monotonic()
    while not all(t.done() for t in tasks):
        await asyncio.sleep(1.0)
        elapsed = time.monotonic() - started
        print(f"bench: {elapsed:5.1f}/{seconds:.0f} s", file=sys.stderr, flush=True)
    return [t.result() for t in tasks]


def run_bench(
    settings: Settings, *, seconds: float, warmup: float = 3.0, viewers: int = 1
) -> dict[str, Any]:
    """Run one measurement on the Ray this process is connected to."""
    import ray

    from cluster.pipeline import Pipeline

    pipeline = Pipeline(settings)
    try:
        info = pipeline.start()
        time.sleep(warmup)
        before = ray.get(pipeline.ingress.stats.remote())
        sampler = CpuSampler()
        sampler.start()
        device_ids = [d.id for d in settings.devices]
        results = asyncio.run(_watch_all(info.url, device_ids, seconds, viewers))
        cpu = sampler.stop()
        after = ray.get(pipeline.ingress.stats.remote())
    finally:
        pipeline.stop()
    first, extra = results[: len(device_ids)], results[len(device_ids) :]
    report = _report(settings, seconds, first, before, after, cpu)
    report["viewers_per_device"] = viewers
    if extra:
        report["extra_viewers"] = {
            "count": len(extra),
            "fps_min": round(min(r.fps() for r in extra), 2),
            "decode_errors": sum(r.decode_errors for r in extra),
            "first_frame_s_p50": percentile([r.first_frame_s or 0 for r in extra], 50),
        }
    return report


def _report(
    settings: Settings,
    seconds: float,
    results: list[Any],
    before: dict[str, Any],
    after: dict[str, Any],
    cpu: dict[str, float],
) -> dict[str, Any]:
    devices = {}
    all_latencies: list[int] = []
    for result in results:
        a = after["devices"][result.device_id]
        b = before["devices"][result.device_id]
        captured = (a["frames_captured"] or 0) - (b["frames_captured"] or 0)
        dropped = a["frames_dropped"] - b["frames_dropped"]
        latencies = result.latencies_ms
        all_latencies += latencies
        indices = result.indices
        devices[result.device_id] = {
            "frames_received": len(indices),
            "frames_captured": captured,
            "in_order": all(y > x for x, y in zip(indices, indices[1:], strict=False)),
            "decode_errors": result.decode_errors,
            "fps": round(result.fps(), 2),
            "dropped_pct": round(100 * dropped / captured, 3) if captured else None,
            "dropped": a["dropped"],
            "capture_to_decoded_ms": {
                p: percentile(latencies, q) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))
            },
            "pipeline_ms": {
                "p50": a.get("capture_to_send_ms_p50"),
                "p99": a.get("capture_to_send_ms_p99"),
            },
            "encode_ms": {"p50": a.get("encode_ms_p50"), "p99": a.get("encode_ms_p99")},
            "first_frame_s": result.first_frame_s,
        }
    capture_cpu = cpu.get("ray::CaptureActor", 0.0)
    captured_per_s = sum(d["frames_captured"] for d in devices.values()) / max(seconds, 1e-9)
    return {
        "capture_cpu_ms_per_frame": round(10 * capture_cpu / captured_per_s, 3)
        if captured_per_s
        else None,
        "sources": sorted({d.source.kind for d in settings.devices}),
        "devices_n": len(settings.devices),
        "seconds": seconds,
        "size": [settings.devices[0].width, settings.devices[0].height]
        if settings.devices
        else None,
        "fps_target": settings.devices[0].fps if settings.devices else None,
        "encoder": {"hwaccel": settings.encoder.hwaccel, "preset": settings.encoder.preset},
        "workers": settings.pool.min_workers,
        "cpu_percent_of_one_core": cpu,
        "total": {
            "fps_mean": round(sum(d["fps"] for d in devices.values()) / max(len(devices), 1), 2),
            "capture_to_decoded_ms": {
                p: percentile(all_latencies, q) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))
            },
            "pipeline_ms_p99_max": max(
                (d["pipeline_ms"]["p99"] or 0 for d in devices.values()), default=None
            ),
            "dropped_pct_max": max((d["dropped_pct"] or 0 for d in devices.values()), default=None),
        },
        "devices": devices,
    }


def _baseline_worker(args: tuple[int, int, float, str]) -> int:
    """One process: generate and encode synthetic frames with plain PyAV for `seconds`."""
    width, height, seconds, preset = args
    from actors.encoder import StreamEncoder
    from actors.synthetic import SyntheticSource
    from configs.schema import DeviceConfig, EncoderConfig

    device = DeviceConfig(id="baseline", width=width, height=height)
    encoder = StreamEncoder(device, EncoderConfig.model_validate({"preset": preset}), "libx264")
    source = SyntheticSource(width=width, height=height)
    frames = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        frame = source.frame_at(frames, int(time.time() * 1000))
        frames += len(encoder.encode(frame.data, frame.capture_ms))
    return frames


def baseline_fps(*, width: int, height: int, seconds: float, processes: int | None = None) -> float:
    """Frames per second plain PyAV encodes without Ray, one process per core."""
    import multiprocessing

    count = processes or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    with context.Pool(count) as pool:
        frames = pool.map(_baseline_worker, [(width, height, seconds, "ultrafast")] * count)
    return sum(frames) / seconds


def pipeline_throughput(settings: Settings, *, seconds: float, warmup: float = 2.0) -> float:
    """Frames per second the pipeline encodes when its sources offer more than it can take.

    The devices run at 120 fps each; back-pressure drops what the encoders cannot take
    (counted), so the encoded rate is the pipeline's capacity, capture and Ray included.
    """
    import ray

    from cluster.pipeline import Pipeline

    fast = settings.model_copy(
        update={"devices": [d.model_copy(update={"fps": 120}) for d in settings.devices]}
    )
    pipeline = Pipeline(fast)
    try:
        pipeline.start()
        time.sleep(warmup)
        first = ray.get(pipeline.ingress.stats.remote())
        time.sleep(seconds)
        last = ray.get(pipeline.ingress.stats.remote())
    finally:
        pipeline.stop()
    span = last["time"] - first["time"]
    encoded = sum(
        (last["devices"][d]["frames_encoded"] or 0) - (first["devices"][d]["frames_encoded"] or 0)
        for d in last["devices"]
    )
    return encoded / span


def efficiency(settings: Settings, *, seconds: float) -> dict[str, Any]:
    """Unthrottled pipeline fps over plain PyAV fps, measured one after the other."""
    device = settings.devices[0]
    print("bench: plain PyAV baseline ...", file=sys.stderr, flush=True)
    base = baseline_fps(width=device.width, height=device.height, seconds=seconds)
    print("bench: unthrottled pipeline ...", file=sys.stderr, flush=True)
    piped = pipeline_throughput(settings, seconds=seconds)
    return {
        "baseline_pyav_fps": round(base, 1),
        "pipeline_unthrottled_fps": round(piped, 1),
        "efficiency": round(piped / base, 3) if base else None,
        "processes": os.cpu_count(),
        "seconds": seconds,
    }


#: DESIGN.md's targets for one load level.
MAX_DROPPED_PCT = 1.0
MAX_PIPELINE_P99_MS = 25.0


def meets_targets(report: dict[str, Any]) -> bool:
    total = report["total"]
    return bool(
        total["dropped_pct_max"] is not None
        and total["dropped_pct_max"] < MAX_DROPPED_PCT
        and total["pipeline_ms_p99_max"] is not None
        and total["pipeline_ms_p99_max"] < MAX_PIPELINE_P99_MS
    )


def find_max(args: Any, *, limit: int = 64) -> dict[str, Any]:
    """The largest device count that meets the targets: double, then bisect."""
    runs: dict[int, dict[str, Any]] = {}

    def trial(n: int) -> bool:
        print(f"bench: find-max trying {n} devices", file=sys.stderr, flush=True)
        settings = bench_settings(
            n, fps=args.fps, width=args.width, height=args.height, workers=args.workers
        )
        runs[n] = run_bench(settings, seconds=args.seconds)
        ok = meets_targets(runs[n])
        total = runs[n]["total"]
        print(
            f"bench: {n} devices: dropped {total['dropped_pct_max']} %, pipeline p99 "
            f"{total['pipeline_ms_p99_max']} ms -> {'ok' if ok else 'over target'}",
            file=sys.stderr,
            flush=True,
        )
        return ok

    good, bad = 0, None
    n = 1
    while n <= limit:
        if trial(n):
            good, n = n, n * 2
        else:
            bad = n
            break
    if bad is not None:
        low, high = good, bad
        while high - low > 1:
            mid = (low + high) // 2
            if trial(mid):
                low = mid
            else:
                high = mid
        good = low
    return {
        "max_devices": good,
        "targets": {
            "dropped_pct_below": MAX_DROPPED_PCT,
            "pipeline_p99_ms_below": MAX_PIPELINE_P99_MS,
        },
        "runs": {str(k): runs[k] for k in sorted(runs)},
    }


def plot(report: dict[str, Any], path: Path) -> bool:
    """A PNG of the run: latency per device, or the find-max curve. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "bench: no plot (pip install 'cloudphone-media[bench]' for matplotlib)", file=sys.stderr
        )
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if "runs" in report:
        ns = sorted(int(k) for k in report["runs"])
        runs = [report["runs"][str(n)]["total"] for n in ns]
        ax.plot(ns, [r["pipeline_ms_p99_max"] for r in runs], "o-", label="pipeline p99 (ms)")
        ax.plot(
            ns,
            [r["capture_to_decoded_ms"]["p99"] for r in runs],
            "s-",
            label="capture-to-decoded p99 (ms)",
        )
        ax.plot(ns, [10 * r["dropped_pct_max"] for r in runs], "^-", label="dropped % x10")
        ax.axhline(MAX_PIPELINE_P99_MS, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("devices")
        ax.set_title(f"find-max: {report['max_devices']} devices meet the targets")
    else:
        names = list(report["devices"])
        for key, label in (("capture_to_decoded_ms", "capture-to-decoded"),):
            for q, marker in (("p50", "o"), ("p99", "s")):
                ax.plot(
                    names,
                    [report["devices"][d][key][q] for d in names],
                    marker,
                    label=f"{label} {q} (ms)",
                )
        ax.plot(
            names,
            [report["devices"][d]["pipeline_ms"]["p99"] for d in names],
            "^",
            label="pipeline p99 (ms)",
        )
        ax.set_title(f"{report['devices_n']} devices, {report['seconds']:.0f} s")
        ax.tick_params(axis="x", rotation=45)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(args: Any) -> int:
    import ray

    if args.config:
        from configs.loader import load_settings

        loaded = load_settings(args.config)
        settings = loaded.model_copy(
            update={"ingress": loaded.ingress.model_copy(update={"port": 0})}
        )
    else:
        settings = bench_settings(
            args.devices, fps=args.fps, width=args.width, height=args.height, workers=args.workers
        )
    if args.address:
        ray.init(address=args.address, namespace="cloudphone-media-bench")
    else:
        ray.init(include_dashboard=False, namespace="cloudphone-media-bench")
    try:
        if args.find_max:
            report = find_max(args)
        else:
            report = run_bench(settings, seconds=args.seconds, viewers=args.viewers)
            report["meets_targets"] = meets_targets(report)
        if args.efficiency:
            report["efficiency"] = efficiency(settings, seconds=max(3.0, args.seconds / 2))
    finally:
        ray.shutdown()
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
        png = Path(args.json).with_suffix(".png")
        if plot(report, png):
            print(f"bench: plot written to {png}", file=sys.stderr)
    print(text)
    return 0

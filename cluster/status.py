"""`cloudphone-media status`: a terminal table of every device of a running pipeline.

Joins the Ray cluster (as a read-only driver), finds the `ingress` actor in the
pipeline's namespace and prints what its stats say; `--watch` redraws every few seconds
until Ctrl-C.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, cast

COLUMNS = [
    ("DEVICE", "<"),
    ("STATUS", "<"),
    ("FPS", ">"),
    ("DROPPED", ">"),
    ("DROP%", ">"),
    ("LAT p50/p99 ms", ">"),
    ("VIEWERS", ">"),
    ("ENCODER", "<"),
    ("NODE", "<"),
    ("HWACCEL", "<"),
]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render(stats: dict[str, Any]) -> str:
    """The table for one /api/stats answer."""
    rows = []
    for device_id, d in sorted(stats.get("devices", {}).items()):
        captured = d.get("frames_captured") or 0
        dropped = d.get("frames_dropped") or 0
        pct = 100 * dropped / captured if captured else None
        latency = f"{_fmt(d.get('capture_to_ingress_ms_p50'))}/" + _fmt(
            d.get("capture_to_ingress_ms_p99")
        )
        rows.append(
            [
                device_id,
                d.get("status", "?"),
                _fmt(d.get("fps")),
                str(dropped),
                _fmt(pct, 2),
                latency,
                str(d.get("viewers", 0)),
                _fmt(d.get("encoder")),
                _fmt(d.get("node")),
                _fmt(d.get("hwaccel")),
            ]
        )
    widths = [
        max([len(name)] + [len(row[i]) for row in rows]) for i, (name, _) in enumerate(COLUMNS)
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(
            f"{cell:{align}{width}}"
            for cell, (_, align), width in zip(cells, COLUMNS, widths, strict=True)
        ).rstrip()

    out = [line([name for name, _ in COLUMNS])]
    out += [line(row) for row in rows]
    pool = stats.get("pool") or {}
    monitor = stats.get("monitor") or {}
    suspects = monitor.get("suspects") or []
    out.append(
        f"{len(rows)} devices, {stats.get('sessions', 0)} viewer sessions, pool "
        f"{pool.get('streams', '?')}/{pool.get('capacity_streams', '?')} streams "
        f"({pool.get('pending_streams', 0)} pending), leak suspects: {len(suspects)}"
    )
    for suspect in suspects:
        out.append(
            f"  leak? {suspect['actor']} {suspect['resource']}: "
            f"{suspect['baseline']} -> {suspect['value']}"
        )
    return "\n".join(out)


def main(args: Any) -> int:
    import ray

    try:
        ray.init(
            address=args.address or "auto", namespace=args.namespace, logging_level=logging.ERROR
        )
    except Exception as exc:  # noqa: BLE001 - any failure to join is the message
        print(
            f"cloudphone-media status: cannot join Ray at {args.address or 'auto'}: {exc}",
            file=sys.stderr,
        )
        return 1
    try:
        try:
            ingress = ray.get_actor("ingress", namespace=args.namespace)
        except ValueError:
            print(
                f"cloudphone-media status: no running pipeline (no 'ingress' actor in "
                f"namespace {args.namespace!r})",
                file=sys.stderr,
            )
            return 1
        while True:
            stats = cast(dict[str, Any], ray.get(ingress.stats.remote(), timeout=10))
            table = render(stats)
            if args.watch:
                stamp = time.strftime("%H:%M:%S")
                print(f"\x1b[H\x1b[2Jcloudphone-media status  {stamp}\n{table}", flush=True)
                time.sleep(args.interval)
            else:
                print(table)
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        ray.shutdown()

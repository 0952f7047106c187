"""The `cloudphone-media` command.

`cloudphone-media run [--config PATH] [--address ADDR]` resolves the configuration (an
invalid one stops here, before Ray starts, with exit status 2), starts a local Ray with
its dashboard or joins the cluster at ADDR, places the pipeline, prints the viewer and
dashboard URLs, and on Ctrl-C or SIGTERM stops every actor it started (and the local Ray
it started, if it started one).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from configs.loader import ConfigError, load_settings

logger = logging.getLogger("cloudphone_media")

EXIT_CONFIG = 2
EXIT_START = 1
STATUS_EVERY_S = 10.0
NAMESPACE = "cloudphone-media"


def default_config() -> Path:
    """The packaged demo configuration (4 synthetic devices)."""
    return Path(str(resources.files("configs").joinpath("demo.yaml")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloudphone-media",
        description="Stream many cloud phones to browsers over WebRTC, on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline until Ctrl-C or SIGTERM")
    run.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML configuration (default: the packaged configs/demo.yaml)",
    )
    run.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join ('auto' or host:port); default: start a local Ray "
        "with the dashboard",
    )
    run.add_argument(
        "--dashboard-port", type=int, default=8265, help="dashboard port of a local Ray"
    )
    bench = sub.add_parser(
        "bench", help="measure N synthetic devices end to end with real WebRTC viewers"
    )
    bench.add_argument("--devices", type=int, default=4, help="synthetic devices (4)")
    bench.add_argument(
        "--config",
        type=Path,
        default=None,
        help="bench the devices of this configuration instead of N synthetic ones",
    )
    bench.add_argument("--seconds", type=float, default=20.0, help="measurement time (20)")
    bench.add_argument("--fps", type=int, default=30)
    bench.add_argument("--width", type=int, default=720)
    bench.add_argument("--height", type=int, default=1280)
    bench.add_argument("--workers", type=int, default=2, help="encoder actors (2)")
    bench.add_argument("--viewers", type=int, default=1, help="aiortc viewers per device (1)")
    bench.add_argument("--address", default=None, help="Ray cluster to join (default: local)")
    bench.add_argument(
        "--json", default=None, help="also write the report here, and a PNG plot beside it"
    )
    bench.add_argument(
        "--find-max",
        action="store_true",
        help="search the most devices with drops < 1 %% and pipeline p99 < 25 ms",
    )
    bench.add_argument(
        "--no-efficiency",
        dest="efficiency",
        action="store_false",
        help="skip the unthrottled run and the plain-PyAV baseline",
    )
    status = sub.add_parser("status", help="a table of every device of a running pipeline")
    status.add_argument("--address", default=None, help="Ray cluster (default: auto)")
    status.add_argument("--namespace", default=NAMESPACE, help=f"Ray namespace ({NAMESPACE})")
    status.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between redraws")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "run":
        return run(args)
    if args.command == "status":
        from cluster.status import main as status_main

        return status_main(args)
    if args.command == "bench":
        from cluster.bench import main as bench_main

        return bench_main(args)
    return EXIT_START  # unreachable: argparse requires a command


def run(args: argparse.Namespace) -> int:
    config_path = args.config or default_config()
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(f"cloudphone-media: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not settings.devices:
        print("cloudphone-media: devices: the configuration names no device", file=sys.stderr)
        return EXIT_CONFIG

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    # Until Ray is up, Ctrl-C simply interrupts; our handlers go in after ray.init,
    # which installs handlers of its own that would otherwise replace them.
    import ray

    from cluster.pipeline import Pipeline, PipelineError

    print(f"cloudphone-media: configuration {config_path}, {len(settings.devices)} devices")
    if not args.address:
        prepare_local_dashboard()
    try:
        if args.address:
            context = ray.init(address=args.address, namespace=NAMESPACE)
        else:
            context = ray.init(
                namespace=NAMESPACE,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=args.dashboard_port,
            )
    except Exception as exc:  # noqa: BLE001 - any failure to reach Ray ends the run
        print(f"cloudphone-media: cannot start or join Ray: {exc}", file=sys.stderr)
        return EXIT_START

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    pipeline = Pipeline(settings)
    code = 0
    try:
        if stop.is_set():
            return 0
        info = pipeline.start()
        dashboard = context.dashboard_url
        print(f"cloudphone-media: viewer    {info.url}", flush=True)
        if settings.ingress.token:
            print("cloudphone-media: (append ?token=<ingress.token> to the viewer URL)")
        if dashboard:
            print(f"cloudphone-media: dashboard http://{dashboard}/", flush=True)
            print(
                "cloudphone-media: (the dashboard asks for Ray's token, in ~/.ray/auth_token "
                "on the head node, unless RAY_AUTH_MODE=disabled)",
                flush=True,
            )
        else:
            print("cloudphone-media: dashboard not running (start Ray with the dashboard)")
        print("cloudphone-media: running; Ctrl-C to stop", flush=True)
        while not stop.wait(STATUS_EVERY_S):
            _print_status(pipeline)
    except PipelineError as exc:
        print(f"cloudphone-media: {exc}", file=sys.stderr)
        code = EXIT_START
    finally:
        print("cloudphone-media: stopping", flush=True)
        pipeline.stop()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("cloudphone-media: stopped", flush=True)
    return code


def prepare_local_dashboard() -> None:
    """Let the dashboard of a Ray we start take stack traces and flame graphs.

    Ray 2.60 turns its py-spy endpoints off unless RAY_DASHBOARD_ENABLE_PROFILING=1 is
    set for the head, and looks py-spy up on PATH: a virtual environment that was not
    activated has it only beside this interpreter. The dashboard listens on 127.0.0.1
    and asks for Ray's token, so enabling it locally exposes nothing.
    """
    os.environ.setdefault("RAY_DASHBOARD_ENABLE_PROFILING", "1")
    bin_dir = os.path.dirname(sys.executable)
    if shutil.which("py-spy") is None and os.path.exists(os.path.join(bin_dir, "py-spy")):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _print_status(pipeline: Any) -> None:
    """One line per interval: fps, viewers and drops of every device."""
    import ray

    if pipeline.ingress is None:
        return
    try:
        stats = ray.get(pipeline.ingress.stats.remote(), timeout=5)
    except Exception as exc:  # noqa: BLE001 - status output must never stop the run
        print(f"cloudphone-media: stats unavailable: {exc}", flush=True)
        return
    parts = []
    for device_id, d in stats["devices"].items():
        parts.append(
            f"{device_id} {d['status']} {d['fps']:.0f}fps v{d['viewers']} drop{d['frames_dropped']}"
        )
    print("cloudphone-media: " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(main())

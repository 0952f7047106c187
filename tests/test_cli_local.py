"""The README's main command: `run` with a local Ray and its dashboard.

The dashboard lists our actors by name and takes a stack trace of one (py-spy); Ctrl-C
stops every process the CLI started. In a module of its own: no other Ray may run beside
it, or the two dashboard agents would compete for one port.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import free_port, wait_for
from tests.test_cli import CliRun, get_json, write_config


def test_run_with_local_ray_stops_everything_it_started(tmp_path: Path) -> None:
    """The README's main command: local Ray with the dashboard, Ctrl-C ends it all."""
    dashboard_port = free_port()
    cli = CliRun(
        "--config",
        str(write_config(tmp_path, devices=1)),
        "--dashboard-port",
        str(dashboard_port),
    )
    try:
        url = cli.read_until(r"viewer\s+(http://\S+)", 180).group(1)
        dashboard = cli.read_until(r"dashboard\s+(http://\S+)", 10).group(1)
        assert f":{dashboard_port}" in dashboard
        wait_for(lambda: get_json(url + "api/devices")[0]["status"] == "live", 30, "device live")
        check_dashboard(dashboard)
        children = psutil.Process(cli.process.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "raylet" in names and "gcs_server" in names
    finally:
        code = cli.stop(signal.SIGINT, timeout=90)
    assert code == 0, "".join(cli.lines)

    def gone() -> bool:
        return not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]

    wait_for(gone, 30, "every process the CLI started to exit")


def check_dashboard(dashboard: str) -> None:
    """The dashboard lists our actors by name and takes a stack trace of one (py-spy)."""
    token_file = Path.home() / ".ray" / "auth_token"
    headers = (
        {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file.exists() else {}
    )

    def fetch(path: str) -> bytes:
        request = urllib.request.Request(dashboard.rstrip("/") + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{path}: {exc.code} {exc.read()[:500]!r}") from None

    def actors() -> dict[str, Any] | None:
        rows = json.loads(fetch("/api/v0/actors?limit=100"))["data"]["result"]["result"]
        alive = {r["name"]: r for r in rows if r["state"] == "ALIVE"}
        wanted = {"ingress", "monitor", "pool", "encoder-0", "capture:cli-0"}
        return alive if wanted <= set(alive) else None

    alive = wait_for(actors, 30, "the dashboard to list ingress, monitor, encoder-0, capture:cli-0")
    ingress = alive["ingress"]
    import ray

    ip = ray.util.get_node_ip_address()  # the one node of this local Ray is this machine
    # The agent registers with the dashboard a little after the actors run: poll.
    trace = wait_for(
        lambda: fetch(f"/worker/traceback?pid={ingress['pid']}&ip={ip}&native=0").decode(),
        30,
        "a stack trace of the ingress actor from the dashboard",
        interval=1,
    )
    assert "Thread" in trace or "Process" in trace, trace[:500]
    assert "not installed" not in trace and "disabled" not in trace, trace[:500]

"""The CLI: `run` against an existing Ray leaves no actor behind; `run` with a local Ray
stops every process it started. Both are stopped the way users stop them (SIGTERM, SIGINT).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, devices: int = 2) -> Path:
    path = tmp_path / "cli.yaml"
    ids = ", ".join(f"{{id: cli-{i}, fps: 15}}" for i in range(devices))
    path.write_text(
        textwrap.dedent(
            f"""
            devices: [{ids}]
            pool: {{workers: 1, streams_per_worker: 4}}
            ingress: {{port: 0}}
            """
        )
    )
    return path


class CliRun:
    """`cloudphone-media run` in a subprocess, its output collected line by line."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CPM__", "RAY_ADDRESS"))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "run", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []

    def read_until(self, pattern: str, timeout: float) -> re.Match[str]:
        import selectors

        selector = selectors.DefaultSelector()
        assert self.process.stdout is not None
        selector.register(self.process.stdout, selectors.EVENT_READ)

        def probe() -> re.Match[str] | None:
            for _ in selector.select(timeout=0.2):
                line = self.process.stdout.readline()  # type: ignore[union-attr]
                if line:
                    self.lines.append(line)
                    found = re.search(pattern, line)
                    if found:
                        return found
            if self.process.poll() is not None:
                raise AssertionError("the CLI exited:\n" + "".join(self.lines[-40:]))
            return None

        return wait_for(probe, timeout, f"{pattern!r} in the CLI's output", interval=0)

    def stop(self, sig: int, timeout: float = 60) -> int:
        self.process.send_signal(sig)
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
            raise AssertionError("the CLI did not stop:\n" + "".join(self.lines) + out) from None
        self.lines.append(out)
        return self.process.returncode


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def our_actors(namespace: str) -> list[str]:
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace
    )


def test_run_on_existing_ray_leaves_no_actor(ray_local: Any, tmp_path: Path) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    cli = CliRun("--config", str(write_config(tmp_path)), "--address", address)
    try:
        url = cli.read_until(r"viewer\s+(http://\S+)", 120).group(1)
        assert get_json(url + "healthz") == {"status": "ok"}
        assert [d["id"] for d in get_json(url + "api/devices")] == ["cli-0", "cli-1"]
        names = ["capture:cli-0", "capture:cli-1", "encoder-0", "ingress", "monitor"]
        assert our_actors("cloudphone-media") == names
        ids = {
            a["ActorID"]: a["Name"]
            for a in ray._private.state.actors().values()
            if a.get("Name") in names
            and a["State"] == "ALIVE"
        }
        assert len(ids) == 5
    finally:
        code = cli.stop(signal.SIGTERM)
    assert code == 0, "".join(cli.lines)
    assert "stopped" in "".join(cli.lines)

    def all_dead() -> bool:
        states = ray._private.state.actors()
        return all(states[actor_id]["State"] == "DEAD" for actor_id in ids)

    wait_for(all_dead, 30, "every actor of the CLI to be dead")
    assert our_actors("cloudphone-media") == []


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
        with urllib.request.urlopen(request, timeout=30) as response:
            return bytes(response.read())

    def actors() -> dict[str, Any] | None:
        rows = json.loads(fetch("/api/v0/actors?limit=100"))["data"]["result"]["result"]
        alive = {r["name"]: r for r in rows if r["state"] == "ALIVE"}
        return alive if {"ingress", "monitor", "encoder-0", "capture:cli-0"} <= set(alive) else None

    alive = wait_for(actors, 30, "the dashboard to list ingress, monitor, encoder-0, capture:cli-0")
    ingress = alive["ingress"]
    import ray

    ip = ray.util.get_node_ip_address()  # the one node of this local Ray is this machine
    trace = fetch(f"/worker/traceback?pid={ingress['pid']}&ip={ip}&native=0").decode()
    assert "Thread" in trace or "Process" in trace, trace[:500]
    assert "not installed" not in trace and "disabled" not in trace, trace[:500]


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "cloudphone-media" in done.stdout

"""The CLI against an existing Ray: `run` leaves no actor behind after SIGTERM.

(`run` with a local Ray is in test_cli_local.py: a second local Ray's dashboard agent
would collide with the one of this module's Ray.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, devices: int = 2) -> Path:
    path = tmp_path / "cli.yaml"
    ids = ", ".join(f"{{id: cli-{i}, fps: 15}}" for i in range(devices))
    path.write_text(
        textwrap.dedent(
            f"""
            devices: [{ids}]
            pool: {{min_workers: 1, streams_per_worker: 4}}
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
        names = ["capture:cli-0", "capture:cli-1", "encoder-0", "ingress", "monitor", "pool"]
        assert our_actors("cloudphone-media") == names
        ids = {
            a["ActorID"]: a["Name"]
            for a in ray._private.state.actors().values()
            if a.get("Name") in names and a["State"] == "ALIVE"
        }
        assert len(ids) == 6
    finally:
        code = cli.stop(signal.SIGTERM)
    assert code == 0, "".join(cli.lines)
    assert "stopped" in "".join(cli.lines)

    def all_dead() -> bool:
        states = ray._private.state.actors()
        return all(states[actor_id]["State"] == "DEAD" for actor_id in ids)

    wait_for(all_dead, 30, "every actor of the CLI to be dead")
    assert our_actors("cloudphone-media") == []


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

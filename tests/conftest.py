"""Shared fixtures: one local Ray per test module, free ports, polling with a deadline."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """A local Ray for this module (2-core machines: start once, shut down after)."""
    import ray

    context = ray.init(num_cpus=4, include_dashboard=False, namespace="cpm-tests")
    try:
        yield context
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def settings(devices: int = 1, **sections: dict[str, Any]) -> Any:
    """Settings for `devices` synthetic 720x1280 devices, ingress on a free port."""
    from configs.schema import Settings

    data: dict[str, Any] = {
        "devices": [{"id": f"dev-{i}", "fps": 30} for i in range(devices)],
        "pool": {"min_workers": 1, "streams_per_worker": 8},
        "ingress": {"port": 0},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return Settings(**data)

"""Headless Chromium opens the viewer page; every device's video decodes frames.

What the page read from each presented frame (the synthetic stamp) is read back over the
DevTools protocol; nothing is assumed from the page having loaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.stats import percentile
from cluster.pipeline import Pipeline, PipelineInfo
from configs.loader import load_settings
from tests.browser import Browser, chromium_available
from tests.conftest import wait_for

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

pytestmark = pytest.mark.skipif(
    not chromium_available(),
    reason="Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)",
)


@pytest.fixture(scope="module")
def demo(ray_local: Any) -> Iterator[PipelineInfo]:
    base = load_settings(DEMO, environ={})
    # The demo's 4 devices, on a free port so a running demo does not collide.
    settings = base.model_copy(update={"ingress": base.ingress.model_copy(update={"port": 0})})
    pipeline = Pipeline(settings)
    try:
        yield pipeline.start()
    finally:
        pipeline.stop()


def test_every_device_decodes_in_chromium(demo: PipelineInfo, tmp_path: Path) -> None:
    with Browser(demo.url) as browser:
        wait_for(
            lambda: browser.evaluate("Object.keys(window.cpm.devices).length") == 4,
            30,
            "the page to list 4 devices",
        )

        def all_playing() -> bool:
            frames = browser.evaluate("Object.values(window.cpm.devices).map(d => d.frames)")
            return bool(frames) and min(frames) >= 90

        wait_for(all_playing, 60, "90 presented frames on every device", interval=0.5)
        # The overlay shows fps, bitrate and the glass-to-glass latency read from the stamp.
        overlays = wait_for(
            lambda: (
                (
                    texts := browser.evaluate(
                        "[...document.querySelectorAll('.device .overlay')].map(e => e.textContent)"
                    )
                )
                and all(re.search(r"glass \d+ ms", t) for t in texts)
                and texts
            ),
            10,
            "a glass-to-glass figure on every device's overlay",
        )
        assert all(re.search(r"\d+\.\d fps +\d+\.\d\d Mbit/s", t) for t in overlays), overlays
        state = browser.evaluate("window.cpm")
        browser.screenshot(tmp_path / "page.png")  # kept by pytest, for a look
    assert state["errors"] == []
    for device_id, d in state["devices"].items():
        assert d["state"] == "live", (device_id, d["state"])
        assert d["backwards"] == 0, (device_id, d.get("lastBackwards"), d["frames"])
        assert d["lastIndex"] > 90, (device_id, d["lastIndex"])
        assert d["latencyMs"], device_id
        print(
            f"\n{device_id}: glass-to-glass p50 {percentile(d['latencyMs'], 50)} ms "
            f"p99 {percentile(d['latencyMs'], 99)} ms over {len(d['latencyMs'])} frames"
        )

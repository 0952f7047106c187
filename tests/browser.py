"""Headless Chromium (Debian's /usr/bin/chromium), driven over the DevTools protocol.

Only the standard library and aiohttp: the browser is started with a remote-debugging
port, the page's websocket is found through /json/list, and `evaluate` runs JavaScript
in the page and returns its value.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = os.environ.get("CPM_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Our own additions: host candidates as IPs (aiortc cannot resolve mDNS names in
    # every sandbox) and video that plays without a user gesture.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]


def chromium_available() -> bool:
    return Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is not None


class Browser:
    """One headless Chromium with one page open at `url`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.profile = tempfile.mkdtemp(prefix="cpm-chromium-")
        self.process: subprocess.Popen[bytes] | None = None
        self._ids = itertools.count(1)

    def __enter__(self) -> Browser:
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                self.url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not open its DevTools port within 30 s")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
            self.process = None
        shutil.rmtree(self.profile, ignore_errors=True)

    def evaluate(self, expression: str) -> Any:
        """Evaluate `expression` in the page; return its JSON value."""
        return asyncio.run(
            self._call(
                "Runtime.evaluate",
                {"expression": expression, "returnByValue": True, "awaitPromise": True},
            )
        )

    def click(self, x: float, y: float) -> None:
        """A real mouse click at page coordinates (x, y)."""
        for kind in ("mousePressed", "mouseReleased"):
            asyncio.run(
                self._call(
                    "Input.dispatchMouseEvent",
                    {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
                )
            )

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{self.port}/json/list") as r:
                targets = await r.json()
            page = next(t for t in targets if t.get("type") == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                call_id = next(self._ids)
                await ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
                async for message in ws:
                    data = json.loads(message.data)
                    if data.get("id") == call_id:
                        if "error" in data:
                            raise RuntimeError(f"{method}: {data['error']}")
                        result = data["result"]
                        if "exceptionDetails" in result:
                            raise RuntimeError(f"page error: {result['exceptionDetails']}")
                        return result.get("result", {}).get("value")
        raise RuntimeError("DevTools closed the connection")

    def screenshot(self, path: Path) -> None:
        import base64

        async def go() -> None:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{self.port}/json/list") as r:
                    page = next(t for t in await r.json() if t.get("type") == "page")
                async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    await ws.send_str(json.dumps({"id": 1, "method": "Page.captureScreenshot"}))
                    async for message in ws:
                        data = json.loads(message.data)
                        if data.get("id") == 1:
                            path.write_bytes(base64.b64decode(data["result"]["data"]))
                            return

        asyncio.run(go())

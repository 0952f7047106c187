"""Capture sources: where a device's frames come from.

Every source is an async iterator of captured items, run by the capture actor's one
task on its event loop:
- `RawFrame`: pixels (yuv420p from synthetic and media sources, packed RGB from
  screencap: the colour conversion happens on the encoder's core);
- `EncodedFrame`: one H.264 access unit (Annex-B) from `adb screenrecord`.
A source paces itself (synthetic and media by their clocks, screencap by polling at the
device's fps, screenrecord by the device). It raises `SourceOffline` when the device
cannot be reached; the capture actor then shows `offline` and retries with back-off.
An iterator that simply ends (screenrecord's time limit) is started again at once.

Subprocesses: each adb call is a child process whose stderr goes to the log; `close`
(and any exit from an iterator) terminates it and reaps it within 5 s (the old service's
ffmpeg leak fix, kept). Blocking work (decoding media, PNG) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from actors.synthetic import RawFrame, SyntheticSource
from configs.schema import (
    AdbScreencapSource,
    AdbScreenrecordSource,
    DeviceConfig,
    MediaSource,
)

logger = logging.getLogger(__name__)

REAP_TIMEOUT_S = 5.0
ADB_TIMEOUT_S = 10.0


class SourceOffline(RuntimeError):
    """The device cannot be reached now; the message says what adb answered."""


@dataclass(frozen=True)
class EncodedFrame:
    """One H.264 access unit captured as the device encoded it."""

    data: bytes
    index: int
    capture_ms: int
    keyframe: bool


Captured = RawFrame | EncodedFrame


def now_ms() -> int:
    return int(time.time() * 1000)


# -- synthetic ------------------------------------------------------------------------


class SyntheticFeed:
    """The synthetic device, paced to its fps on a monotonic clock."""

    def __init__(self, device: DeviceConfig, phase: float = 0.0) -> None:
        self.device = device
        scroll = getattr(device.source, "scroll_px_per_frame", 4)
        self.source = SyntheticSource(
            width=device.width, height=device.height, scroll_px_per_frame=scroll
        )
        self.phase = phase
        self.late_frames = 0

    def tap(self, x: float, y: float) -> None:
        self.source.tap(x, y)

    async def frames(self) -> AsyncIterator[Captured]:
        period = 1.0 / self.device.fps
        next_tick = time.monotonic() + (self.phase % 1.0) * period
        while True:
            delay = next_tick - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            late = int((time.monotonic() - next_tick) / period)
            # Whole frame intervals the loop fell behind: those frames were never made.
            self.late_frames += max(0, late)
            next_tick += period * (1 + max(0, late))
            yield self.source.next_frame()

    async def close(self) -> None:
        return None


# -- adb --------------------------------------------------------------------------------


class Adb:
    """Runs adb for one device: argument lists only, stderr to the log, always reaped."""

    def __init__(self, adb_path: str, serial: str) -> None:
        self.adb_path = adb_path
        self.serial = serial
        self.children: set[asyncio.subprocess.Process] = set()

    async def spawn(self, *rest: str, serial: bool = True) -> asyncio.subprocess.Process:
        """Start `adb [-s SERIAL] REST...`; the caller reaps it (or `close` does)."""
        argv = [self.adb_path, *(["-s", self.serial] if serial else []), *rest]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise SourceOffline(f"cannot run {self.adb_path!r}: {exc.strerror}") from exc
        self.children.add(proc)
        return proc

    async def _complete(
        self, *rest: str, serial: bool = True, timeout: float = ADB_TIMEOUT_S
    ) -> tuple[int | None, bytes, bytes]:
        """Run one adb command to its end, reaped whatever happens: (exit, stdout, stderr)."""
        proc = await self.spawn(*rest, serial=serial)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError as exc:
            raise SourceOffline(f"adb {' '.join(rest)} did not answer in {timeout:g} s") from exc
        finally:
            await self.reap(proc)
        return proc.returncode, out, err

    async def run(self, *rest: str, timeout: float = ADB_TIMEOUT_S) -> bytes:
        """Run one adb command on the device; its stdout, or SourceOffline with its stderr."""
        code, out, err = await self._complete(*rest, timeout=timeout)
        if code != 0:
            raise SourceOffline(_first_line(err) or f"adb exited with {code}")
        if err.strip():
            logger.info("adb %s: %s", self.serial, _first_line(err))
        return out

    async def connect_if_network(self) -> None:
        """`adb connect host:port` for a network device (idempotent on adb's side)."""
        if ":" not in self.serial:
            return
        code, out, err = await self._complete("connect", self.serial, serial=False)
        text = (out + err).decode(errors="replace").strip()
        # adb connect exits 0 on some failures: its words tell.
        if code != 0 or "cannot" in text or "failed" in text:
            raise SourceOffline(f"adb connect {self.serial}: {text}")

    async def reap(self, proc: asyncio.subprocess.Process) -> None:
        """Terminate (then kill) and wait, within REAP_TIMEOUT_S; log its stderr."""
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), REAP_TIMEOUT_S / 2)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await asyncio.wait_for(proc.wait(), REAP_TIMEOUT_S / 2)
        finally:
            self.children.discard(proc)

    async def close(self) -> None:
        await asyncio.gather(*(self.reap(p) for p in list(self.children)), return_exceptions=True)


def _first_line(data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return text.splitlines()[0] if text else ""


async def _log_stderr(stream: asyncio.StreamReader | None, serial: str) -> None:
    if stream is None:
        return
    while line := await stream.readline():
        logger.info("adb %s: %s", serial, line.decode(errors="replace").rstrip())


class ScreenrecordFeed:
    """`screenrecord --output-format=h264`, split into access units by FFmpeg's parser.

    Each run ends at the time limit (or when the device drops it); `frames` ends then
    and the capture actor starts the next run at once. The new run begins with SPS/PPS
    and an IDR, which go to the viewers (or the transcoder) like any other unit; the
    capture clock keeps the timestamps rising.
    """

    def __init__(self, device: DeviceConfig) -> None:
        assert isinstance(device.source, AdbScreenrecordSource)
        self.device = device
        self.config = device.source
        self.adb = Adb(self.config.adb_path, self.config.serial)
        self.index = 0
        self.runs = 0
        self.last_end = 0.0
        self.restart_gaps_ms: list[float] = []
        self.parameter_sets = b""
        """The device's last SPS and PPS (Annex-B), put before IDRs that lack them."""
        self.parameter_sets_added = 0

    async def frames(self) -> AsyncIterator[Captured]:
        await self.adb.connect_if_network()
        c, d = self.config, self.device
        proc = await self.adb.spawn(
            "exec-out", "screenrecord", "--output-format=h264",
            f"--size={d.width}x{d.height}", f"--bit-rate={c.bit_rate_bps}",
            f"--time-limit={c.time_limit_s}", "-",
        )  # fmt: skip
        stderr_task = asyncio.create_task(_log_stderr(proc.stderr, c.serial))
        parser = av.CodecContext.create("h264", "r")
        started = time.monotonic()
        got_any = False
        try:
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(65536):
                for packet in parser.parse(chunk):
                    if not got_any:
                        got_any = True
                        self.runs += 1
                        if self.last_end:
                            self.restart_gaps_ms.append((time.monotonic() - self.last_end) * 1000)
                    yield self._unit(bytes(packet))
            for packet in parser.parse(b""):
                yield self._unit(bytes(packet))
        finally:
            self.last_end = time.monotonic()
            await self.adb.reap(proc)
            stderr_task.cancel()
        if not got_any:
            raise SourceOffline(
                f"screenrecord on {c.serial} produced nothing "
                f"(exit {proc.returncode} after {time.monotonic() - started:.1f} s)"
            )

    def _unit(self, data: bytes) -> EncodedFrame:
        # A device sends SPS and PPS once, before its first IDR (MediaCodec's codec
        # config); later IDRs come without them. Each IDR goes out with the last ones
        # seen, so that a viewer, or a transcoder after a failover, can start at any IDR.
        nals = nal_units(data)
        kinds = {kind for kind, _, _ in nals}
        if kinds & {7, 8}:
            self.parameter_sets = b"".join(data[s:e] for kind, s, e in nals if kind in (7, 8))
        if 5 in kinds and not {7, 8} <= kinds and self.parameter_sets:
            data = self.parameter_sets + data
            self.parameter_sets_added += 1
        unit = EncodedFrame(data, self.index, now_ms(), 5 in kinds)
        self.index += 1
        return unit

    async def close(self) -> None:
        await self.adb.close()


def nal_units(data: bytes) -> list[tuple[int, int, int]]:
    """Where the NAL units of an Annex-B access unit are: (type, start, end), each
    span holding its start code. Nothing is copied: this runs on every device unit."""
    starts = []
    at = data.find(b"\x00\x00\x01")
    while at >= 0 and at + 3 < len(data):
        # A 4-byte start code owns the zero before it.
        starts.append(at - 1 if at > 0 and data[at - 1] == 0 else at)
        at = data.find(b"\x00\x00\x01", at + 3)
    ends = starts[1:] + [len(data)]
    return [
        (data[s + (4 if data[s + 2] == 0 else 3)] & 0x1F, s, e)
        for s, e in zip(starts, ends, strict=True)
    ]


#: screencap's raw pixel formats (Android PixelFormat) -> (PyAV format, bytes per pixel).
SCREENCAP_FORMATS = {1: ("rgba", 4), 2: ("rgba", 4), 3: ("rgb24", 3), 4: ("rgb565le", 2)}


def parse_screencap(data: bytes) -> tuple[np.ndarray, str, int, int]:
    """Split raw `screencap` output: (pixels as rows of bytes, PyAV format, width, height).

    The header is 12 bytes (width, height, format) or, since Android 12, 16 (plus a colour
    space); which one is told by the size of what follows.
    """
    if len(data) < 12:
        raise ValueError(f"screencap: {len(data)} bytes, shorter than its header")
    width, height, fmt = np.frombuffer(data[:12], dtype="<u4")
    if int(fmt) not in SCREENCAP_FORMATS:
        raise ValueError(f"screencap: pixel format {int(fmt)} is not supported")
    pix_fmt, bpp = SCREENCAP_FORMATS[int(fmt)]
    size = int(width) * int(height) * bpp
    for header in (16, 12):
        if len(data) - header == size:
            rows = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(
                int(height), int(width) * bpp
            )
            if bpp == 2:
                return (
                    rows.view("<u2").reshape(int(height), int(width)),
                    pix_fmt,
                    int(width),
                    int(height),
                )
            return rows.reshape(int(height), int(width), bpp), pix_fmt, int(width), int(height)
    raise ValueError(
        f"screencap: {len(data)} bytes do not match {int(width)}x{int(height)} format {int(fmt)}"
    )


def decode_png(data: bytes) -> np.ndarray:
    """A PNG screenshot as an RGB array."""
    codec = av.CodecContext.create("png", "r")
    frames = codec.decode(av.Packet(data))
    if not frames:
        raise ValueError("screencap -p: not a PNG")
    return frames[0].to_ndarray(format="rgb24")


class ScreencapFeed:
    """`screencap` polled at the device's fps; unchanged frames skipped (counted), with a
    refresh every `refresh_s` so an IDR is always possible."""

    def __init__(self, device: DeviceConfig) -> None:
        assert isinstance(device.source, AdbScreencapSource)
        self.device = device
        self.config = device.source
        self.adb = Adb(self.config.adb_path, self.config.serial)
        self.index = 0
        self.unchanged = 0

    async def frames(self) -> AsyncIterator[Captured]:
        await self.adb.connect_if_network()
        period = 1.0 / self.device.fps
        last_crc: int | None = None
        last_sent = 0.0
        next_tick = time.monotonic()
        while True:
            delay = next_tick - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            next_tick = max(next_tick + period, time.monotonic())
            args = ("exec-out", "screencap", "-p") if self.config.png else ("exec-out", "screencap")
            data = await self.adb.run(*args)
            captured = now_ms()
            crc = zlib.crc32(data)
            if crc == last_crc and time.monotonic() - last_sent < self.config.refresh_s:
                self.unchanged += 1
                continue
            last_crc, last_sent = crc, time.monotonic()
            try:
                if self.config.png:
                    pixels = await asyncio.to_thread(decode_png, data)
                    pix_fmt = "rgb24"
                else:
                    pixels, pix_fmt, _w, _h = parse_screencap(data)
            except ValueError as exc:
                raise SourceOffline(str(exc)) from exc
            yield RawFrame(data=pixels, index=self.index, capture_ms=captured, pix_fmt=pix_fmt)
            self.index += 1

    async def close(self) -> None:
        await self.adb.close()


# -- media ------------------------------------------------------------------------------


class MediaFeed:
    """Anything PyAV opens, decoded in a worker thread and paced by its timestamps.

    Frames are converted to yuv420p at the device's size here (the decoder's output is
    already planar YUV for almost every input). A file starts again at its end.
    """

    def __init__(self, device: DeviceConfig) -> None:
        assert isinstance(device.source, MediaSource)
        self.device = device
        self.config = device.source
        self.index = 0
        self.loops = 0
        self._container: Any = None

    def _open(self) -> Any:
        try:
            return av.open(
                self.config.url, format=self.config.format, options=dict(self.config.options)
            )
        except (av.FFmpegError, OSError) as exc:
            raise SourceOffline(f"cannot open {self.config.url!r}: {exc}") from exc

    def _decode_some(self, frames: Any, count: int) -> list[Any]:
        """Up to `count` decoded frames from one pass's frame iterator ([] at the end)."""
        out = []
        for frame in frames:
            out.append(
                (
                    frame.time,
                    frame.reformat(
                        width=self.device.width, height=self.device.height, format="yuv420p"
                    ).to_ndarray(),
                )
            )
            if len(out) >= count:
                break
        return out

    async def frames(self) -> AsyncIterator[Captured]:
        while True:
            container = await asyncio.to_thread(self._open)
            self._container = container
            try:
                stream = container.streams.video[0]
            except IndexError as exc:
                container.close()
                raise SourceOffline(f"{self.config.url!r} has no video stream") from exc
            stream.thread_type = "AUTO"
            started = time.monotonic()
            first_time: float | None = None
            frames = container.decode(stream)  # one iterator per pass: it flushes at the end
            try:
                while True:
                    try:
                        batch = await asyncio.to_thread(self._decode_some, frames, 4)
                    except av.EOFError:
                        batch = []
                    if not batch:
                        break
                    for pts_s, pixels in batch:
                        if pts_s is not None:
                            first_time = pts_s if first_time is None else first_time
                            delay = started + (pts_s - first_time) - time.monotonic()
                            if delay > 0:
                                await asyncio.sleep(delay)
                        yield RawFrame(data=pixels, index=self.index, capture_ms=now_ms())
                        self.index += 1
            except av.FFmpegError as exc:
                raise SourceOffline(f"{self.config.url!r}: {exc}") from exc
            finally:
                container.close()
                self._container = None
            if not self.config.loop:
                return
            self.loops += 1

    async def close(self) -> None:
        return None


def make_feed(device: DeviceConfig, phase: float = 0.0) -> Any:
    kind = device.source.kind
    if kind == "synthetic":
        return SyntheticFeed(device, phase)
    if kind == "adb-screenrecord":
        return ScreenrecordFeed(device)
    if kind == "adb-screencap":
        return ScreencapFeed(device)
    return MediaFeed(device)

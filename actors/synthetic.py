"""The synthetic device: a phone-like screen that scrolls, stamped per DESIGN.md.

Frames are YUV 4:2:0 planar (`yuv420p` as PyAV lays it out: an array of H*3/2 rows of
W bytes, Y then U then V), so no colour conversion happens anywhere before the encoder.
The content is drawn once into a strip one screen plus one period tall; each frame is a
copy of a window of it, so producing a frame costs one 1.4 MB memcpy at 720x1280.

Pacing is on `time.monotonic()`; the stamp's capture time is the wall clock
(`time.time()`), because glass-to-glass is measured against another machine's clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from actors.stamp import STAMP_HEIGHT, STAMP_WIDTH, write_stamp

_STATUS_BAR = 48  # rows of the fixed status bar the stamp sits on
#: A tap marker: its size in pixels, and how many frames it stays.
MARKER_SIZE = 64
MARKER_FRAMES = 30
_ROW = 96  # height of one list item, in pixels (even)
_PERIOD_ROWS = 16  # list items before the content repeats


@dataclass(frozen=True)
class RawFrame:
    """One captured frame, as it travels to the encoder."""

    data: np.ndarray
    """The pixels; for yuv420p the planes, shape (height * 3 // 2, width), uint8."""
    index: int
    """Frame index from the source's start, stamped into synthetic frames."""
    capture_ms: int
    """Capture wall-clock time in ms (`time.time() * 1000`)."""
    pix_fmt: str = "yuv420p"
    """Pixel layout of `data`: yuv420p (planes), rgba / rgb24 (H x W x C), rgb565le (H x W)."""


class SyntheticSource:
    """Generates stamped frames of a scrolling list, like a phone's screen."""

    def __init__(self, *, width: int, height: int, scroll_px_per_frame: int = 4) -> None:
        if width < STAMP_WIDTH or height < STAMP_HEIGHT + _STATUS_BAR:
            raise ValueError(
                f"synthetic frames need at least {STAMP_WIDTH}x{STAMP_HEIGHT + _STATUS_BAR} "
                f"pixels for the stamp, got {width}x{height}"
            )
        if width % 2 or height % 2 or scroll_px_per_frame % 2:
            raise ValueError("width, height and scroll_px_per_frame must be even")
        self.width = width
        self.height = height
        self.scroll = scroll_px_per_frame
        self.period = _ROW * _PERIOD_ROWS
        self._y, self._u, self._v = _draw_strip(width, height + self.period)
        self.index = 0
        self._marker: tuple[int, int] | None = None
        self._marker_until = -1

    def tap(self, x: float, y: float) -> None:
        """Show a marker centred at normalised (x, y) for the next MARKER_FRAMES frames."""
        self._marker = (round(x * (self.width - 1)), round(y * (self.height - 1)))
        self._marker_until = self.index + MARKER_FRAMES

    def frame_at(self, index: int, capture_ms: int) -> RawFrame:
        """Frame number `index`, stamped with `capture_ms`."""
        w, h = self.width, self.height
        out = np.empty((h * 3 // 2, w), dtype=np.uint8)
        offset = (index * self.scroll) % self.period
        y = out[:h]
        y[:] = self._y[offset : offset + h]
        # Chroma planes follow the luma rows in yuv420p: U is h/4 rows of w, then V.
        cw, ch, co = w // 2, h // 2, offset // 2
        u = out[h : h + h // 4].reshape(ch, cw)
        v = out[h + h // 4 :].reshape(ch, cw)
        u[:] = self._u[co : co + ch]
        v[:] = self._v[co : co + ch]
        # A fixed status bar, as phones have; the stamp sits on it with neutral chroma.
        y[:_STATUS_BAR] = 40
        u[: _STATUS_BAR // 2] = 128
        v[: _STATUS_BAR // 2] = 128
        if self._marker is not None and index < self._marker_until:
            self._draw_marker(y, u, v, *self._marker)
        write_stamp(y, index, capture_ms)
        return RawFrame(data=out, index=index, capture_ms=capture_ms)

    def _draw_marker(self, y: np.ndarray, u: np.ndarray, v: np.ndarray, cx: int, cy: int) -> None:
        """A black square with a white ring: unmistakable on the light list content."""
        half = MARKER_SIZE // 2
        x0, x1 = max(0, cx - half) & ~1, min(self.width, cx + half) & ~1
        y0, y1 = max(0, cy - half) & ~1, min(self.height, cy + half) & ~1
        y[y0:y1, x0:x1] = 235
        y[y0 + 4 : y1 - 4, x0 + 4 : x1 - 4] = 16
        u[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2] = 128
        v[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2] = 128

    def next_frame(self) -> RawFrame:
        """The next frame, stamped with the wall clock now."""
        frame = self.frame_at(self.index, int(time.time() * 1000))
        self.index += 1
        return frame


def _draw_strip(width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw a list of items with avatars and text-like lines (luma and chroma planes)."""
    y = np.full((height, width), 230, dtype=np.uint8)
    u = np.full((height // 2, width // 2), 128, dtype=np.uint8)
    v = np.full((height // 2, width // 2), 128, dtype=np.uint8)
    for top in range(0, height, _ROW):
        item = (top // _ROW) % _PERIOD_ROWS
        item_rng = np.random.default_rng(item)
        # Separator line.
        y[top : top + 2] = 200
        # Avatar: a coloured square.
        a0, a1 = top + 16, min(top + 80, height)
        y[a0:a1, 24:88] = 90 + 10 * (item % 8)
        u[a0 // 2 : a1 // 2, 12:44] = int(item_rng.integers(60, 200))
        v[a0 // 2 : a1 // 2, 12:44] = int(item_rng.integers(60, 200))
        # Two lines of "text": dark runs of random length on the light background.
        for line, (t0, length) in enumerate(((top + 24, 0.7), (top + 56, 0.5))):
            t1 = min(t0 + 14, height)
            if t0 >= height:
                continue
            end = 112 + int((width - 140) * length * item_rng.uniform(0.6, 1.0))
            glyphs = item_rng.integers(0, 2, size=(t1 - t0, (end - 112) // 6 + 1), dtype=np.uint8)
            run = np.repeat(glyphs, 6, axis=1)[:, : end - 112]
            y[t0:t1, 112:end] = np.where(run == 1, 40 + 30 * line, 230).astype(np.uint8)
    # Items repeat every _PERIOD_ROWS, each drawn from its own seed, so the window at
    # offset `period` equals the one at 0 and the scroll wraps without a jump.
    return y, u, v

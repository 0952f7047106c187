"""The synthetic device's stamp (DESIGN.md, fixed: other tools read it exactly so).

Two rows of 32 blocks of 16x16 pixels at the top-left corner of the luma plane:
row 0 (y 0-15) holds the frame index, row 1 (y 16-31) the capture wall-clock time in
milliseconds modulo 2**32; luma 235 is a 1, luma 16 a 0, most significant bit first.
A reader takes a block as 1 when its mean luma is above 128.
"""

from __future__ import annotations

import numpy as np

BLOCK = 16
BITS = 32
ONE = 235
ZERO = 16
THRESHOLD = 128
STAMP_WIDTH = BLOCK * BITS
STAMP_HEIGHT = 2 * BLOCK

_SHIFTS = np.arange(BITS - 1, -1, -1, dtype=np.uint64)
_WEIGHTS = (np.uint64(1) << _SHIFTS).astype(np.uint64)


def _bits(value: int) -> np.ndarray:
    return ((np.uint64(value & 0xFFFFFFFF) >> _SHIFTS) & np.uint64(1)).astype(bool)


def write_stamp(luma: np.ndarray, index: int, capture_ms: int) -> None:
    """Write the stamp into `luma` (H x W uint8, W >= 512, H >= 32) in place."""
    for row, value in enumerate((index, capture_ms)):
        levels = np.where(_bits(value), ONE, ZERO).astype(np.uint8)
        # One 16-pixel-wide run per bit, repeated down the block's 16 rows.
        band = np.repeat(levels, BLOCK)
        luma[row * BLOCK : (row + 1) * BLOCK, :STAMP_WIDTH] = band


def read_stamp(luma: np.ndarray) -> tuple[int, int]:
    """Return (frame index, capture time in ms mod 2**32) read from a decoded luma plane."""
    area = luma[:STAMP_HEIGHT, :STAMP_WIDTH].astype(np.uint32)
    means = area.reshape(2, BLOCK, BITS, BLOCK).mean(axis=(1, 3))
    bits = (means > THRESHOLD).astype(np.uint64)
    index, capture_ms = (int((bits[row] * _WEIGHTS).sum()) for row in range(2))
    return index, capture_ms


def stamp_age_ms(capture_ms: int, now_ms: int) -> int:
    """Milliseconds from a stamp's capture time to `now_ms`, across the 2**32 wrap."""
    return (now_ms - capture_ms) % (1 << 32)

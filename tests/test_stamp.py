"""The synthetic stamp: exact layout, and it survives a libx264 encode and decode."""

from __future__ import annotations

import av
import numpy as np
import pytest

from actors.encoder import StreamEncoder
from actors.stamp import read_stamp, stamp_age_ms, write_stamp
from actors.synthetic import SyntheticSource
from configs.schema import DeviceConfig, EncoderConfig


def test_stamp_layout_is_the_one_design_fixes() -> None:
    luma = np.full((64, 720), 77, dtype=np.uint8)
    write_stamp(luma, index=0b1011, capture_ms=0x80000001)
    # Row 0, last four blocks: 1 0 1 1 -> 235, 16, 235, 235, each 16x16.
    assert (luma[0:16, 28 * 16 : 29 * 16] == 235).all()
    assert (luma[0:16, 29 * 16 : 30 * 16] == 16).all()
    assert (luma[0:16, 30 * 16 : 32 * 16] == 235).all()
    assert (luma[0:16, 0 : 28 * 16] == 16).all()
    # Row 1: MSB first, so the first and last blocks are 1.
    assert (luma[16:32, 0:16] == 235).all() and (luma[16:32, 496:512] == 235).all()
    assert (luma[16:32, 16:496] == 16).all()
    # Nothing outside the 512x32 corner is touched.
    assert (luma[32:] == 77).all() and (luma[:, 512:] == 77).all()
    assert read_stamp(luma) == (11, 0x80000001)


def test_stamp_age_wraps() -> None:
    assert stamp_age_ms(2**32 - 5, 10) == 15
    assert stamp_age_ms(100, 130) == 30


def test_synthetic_frames_scroll_and_carry_index_and_time() -> None:
    source = SyntheticSource(width=720, height=1280)
    a, b = source.next_frame(), source.next_frame()
    assert a.data.shape == (1920, 720) and a.data.dtype == np.uint8
    assert (a.index, b.index) == (0, 1)
    assert read_stamp(a.data[:1280])[0] == 0 and read_stamp(b.data[:1280])[0] == 1
    assert read_stamp(b.data[:1280])[1] == b.capture_ms % 2**32
    # The content below the status bar moves between frames (it scrolls).
    assert not np.array_equal(a.data[100:1280], b.data[100:1280])


@pytest.mark.parametrize("bitrate", [EncoderConfig().bitrate_bps, 1000000])
def test_stamp_survives_libx264_at_the_configured_bitrate(bitrate: int) -> None:
    device = DeviceConfig(id="d", width=720, height=1280, fps=30)
    config = EncoderConfig(bitrate_bps=bitrate)
    encoder = StreamEncoder(device, config, "libx264")
    decoder = av.CodecContext.create("h264", "r")
    source = SyntheticSource(width=720, height=1280)
    read: list[tuple[int, int]] = []
    sent: list[tuple[int, int]] = []
    for i in range(90):
        frame = source.frame_at(i, capture_ms=1_700_000_000_000 + i * 33)
        sent.append((i, frame.capture_ms % 2**32))
        for payload, _key, _ms in encoder.encode(frame.data, frame.capture_ms):
            for decoded in decoder.decode(av.Packet(payload)):
                luma = decoded.to_ndarray()[: decoded.height]
                read.append(read_stamp(luma))
    for decoded in decoder.decode(None):
        read.append(read_stamp(decoded.to_ndarray()[: decoded.height]))
    assert read == sent
    assert encoder.stats.keyframes >= 2  # keyframe_interval 60 over 90 frames


def test_requested_keyframe_is_an_idr_with_parameter_sets() -> None:
    device = DeviceConfig(id="d")
    encoder = StreamEncoder(device, EncoderConfig(keyframe_interval=600), "libx264")
    source = SyntheticSource(width=720, height=1280)
    kinds = []
    for i in range(10):
        if i == 5:
            encoder.request_keyframe()
        for payload, key, _ in encoder.encode(source.frame_at(i, i * 33).data, i * 33.0):
            kinds.append((key, payload[4] & 0x1F))  # first NAL type after the start code
    assert kinds[0] == (True, 7) and kinds[5] == (True, 7)  # SPS first
    assert all(not key for key, _ in kinds[1:5] + kinds[6:])

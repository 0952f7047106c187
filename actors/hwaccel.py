"""H.264 encoder backends: detection on this node and per-backend low-latency options.

Detection really opens a small encoder of each candidate and encodes one frame, because a
codec that FFmpeg lists may still fail to open (no GPU, no driver, session cap reached).
It runs on the encoder actor's own node: worker nodes differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction
from typing import cast

import av
import numpy as np
from av.video.codeccontext import VideoCodecContext

from configs.schema import EncoderConfig

logger = logging.getLogger(__name__)

#: Probe order for `hwaccel: auto`, and the FFmpeg encoder behind each backend.
BACKENDS: dict[str, str] = {
    "nvenc": "h264_nvenc",
    "qsv": "h264_qsv",
    "vaapi": "h264_vaapi",
    "libx264": "libx264",
}


class EncoderUnavailable(RuntimeError):
    """The requested encoder backend cannot be opened on this node."""


@dataclass
class Detection:
    """What `detect` found on this node."""

    backend: str
    """The backend chosen (`nvenc`, `qsv`, `vaapi` or `libx264`)."""
    codec_name: str
    """The FFmpeg encoder name behind it."""
    failures: dict[str, str] = field(default_factory=dict)
    """Why each backend tried before it failed."""


def codec_options(
    backend: str, config: EncoderConfig, fps: int, ceiling_bps: int | None = None
) -> dict[str, str]:
    """Low-latency options for `backend`: no B-frames, fixed GOP, VBV sized to the bitrate.

    `ceiling_bps` (default: the bitrate) is libx264's VBV maximum rate. The target
    bitrate can later move below it without reopening the encoder (see
    `StreamEncoder.set_bitrate`): FFmpeg reconfigures x264 when the context's bit_rate
    changes, provided the VBV is set through the generic `maxrate` and `bufsize` options
    (a vbv-maxrate in x264-params is reset to 0 at the first frame, and x264 then
    refuses every later rate change).
    """
    gop = str(config.keyframe_interval)
    if backend == "libx264":
        kbps = max(config.bitrate_bps, ceiling_bps or 0) // 1000
        # A VBV of a few frames' worth keeps keyframes small (DESIGN decision 8: under
        # about 128 RTP packets) and the rate steady; repeat-headers puts SPS/PPS before
        # every IDR so any IDR starts a new viewer.
        vbv = max(kbps // max(fps, 1) * 8, 100)
        params = (
            f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:repeat-headers=1:"
            f"annexb=1:force-cfr=1"
        )
        return {
            "maxrate": f"{kbps}k",
            "bufsize": f"{vbv}k",
            "preset": config.preset,
            "tune": "zerolatency",
            "profile": "baseline",
            "x264-params": params,
            "forced-idr": "1",
            "threads": str(config.threads),
        }
    if backend == "nvenc":
        return {
            "preset": "p1",
            "tune": "ull",
            "rc": "cbr",
            "zerolatency": "1",
            "bf": "0",
            "g": gop,
            "profile": "baseline",
            "forced-idr": "1",
            "delay": "0",
        }
    if backend == "qsv":
        return {
            "preset": "veryfast",
            "bf": "0",
            "g": gop,
            "profile": "baseline",
            "forced_idr": "1",
            "async_depth": "1",
            "low_power": "0",
        }
    if backend == "vaapi":
        return {"bf": "0", "g": gop, "profile": "constrained_baseline", "rc_mode": "CBR"}
    raise ValueError(f"unknown encoder backend {backend!r}; allowed: {', '.join(BACKENDS)}")


def open_context(
    backend: str,
    config: EncoderConfig,
    *,
    width: int,
    height: int,
    fps: int,
    ceiling_bps: int | None = None,
) -> VideoCodecContext:
    """Open an encoder context for one stream (raises EncoderUnavailable)."""
    name = BACKENDS[backend]
    try:
        ctx = cast(VideoCodecContext, av.CodecContext.create(name, "w"))
        ctx.width = width
        ctx.height = height
        ctx.pix_fmt = "yuv420p" if backend == "libx264" else _hw_pix_fmt(backend)
        ctx.time_base = Fraction(1, 90_000)
        ctx.framerate = Fraction(fps, 1)
        ctx.bit_rate = config.bitrate_bps
        ctx.gop_size = config.keyframe_interval
        ctx.max_b_frames = 0
        ctx.options = codec_options(backend, config, fps, ceiling_bps)
        ctx.open()
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise EncoderUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc
    return ctx


def _hw_pix_fmt(backend: str) -> str:
    # NVENC and QSV take nv12/yuv420p from system memory; VA-API needs nv12 uploaded by
    # FFmpeg's hwupload, which a plain codec context cannot do: it is probed, and fails
    # there with a clear reason until a VA-API upload path exists.
    return "yuv420p" if backend == "nvenc" else "nv12"


def probe(backend: str, config: EncoderConfig) -> None:
    """Open a small encoder of `backend` and encode one frame; raise EncoderUnavailable."""
    ctx = open_context(backend, config, width=256, height=256, fps=30)
    try:
        frame = av.VideoFrame.from_ndarray(
            np.full((384, 256), 128, dtype=np.uint8), format="yuv420p"
        )
        if ctx.pix_fmt != "yuv420p":
            frame = frame.reformat(format=ctx.pix_fmt)
        frame.pts = 0
        ctx.encode(frame)
        ctx.encode(None)
    except (av.FFmpegError, ValueError) as exc:
        raise EncoderUnavailable(f"{BACKENDS[backend]}: {type(exc).__name__}: {exc}") from exc


def detect(config: EncoderConfig) -> Detection:
    """Choose the backend for `config.hwaccel` on this node.

    `auto` takes the first backend that works and logs why the others failed; a forced
    backend that does not work raises EncoderUnavailable instead of falling back.
    """
    candidates = list(BACKENDS) if config.hwaccel == "auto" else [config.hwaccel]
    failures: dict[str, str] = {}
    for backend in candidates:
        try:
            probe(backend, config)
        except EncoderUnavailable as exc:
            failures[backend] = str(exc)
            continue
        for other, why in failures.items():
            logger.info("encoder backend %s unavailable: %s", other, why)
        logger.info("encoder backend: %s (%s)", backend, BACKENDS[backend])
        return Detection(backend=backend, codec_name=BACKENDS[backend], failures=failures)
    if config.hwaccel == "auto":
        raise EncoderUnavailable(
            "no H.264 encoder opens on this node: "
            + "; ".join(f"{name}: {why}" for name, why in failures.items())
        )
    raise EncoderUnavailable(
        f"encoder.hwaccel={config.hwaccel!r} was forced but does not work on this node "
        f"({failures[config.hwaccel]}); use hwaccel: auto to fall back"
    )

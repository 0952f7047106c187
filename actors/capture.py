"""Capture: one `CaptureWorker` per device, behind a `capture:<device>` actor.

The worker runs one asyncio task (on the actor's event loop) that paces the source on
`time.monotonic()`, puts each frame into Ray's object store once and hands the ref to its
stream's encoder. Back-pressure (DESIGN decision 2): at most `max_in_flight` frames wait
on the encoder; a frame that finds no room is dropped before it is put and counted under
`backpressure`. Nothing is dropped without a count: `dropped` holds every reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from actors import metrics
from actors.stats import process_resources
from actors.synthetic import RawFrame, SyntheticSource
from configs.schema import DeviceConfig

logger = logging.getLogger(__name__)

#: Hands one frame to the encoder; the awaitable completes when it has been encoded.
Submit = Callable[[RawFrame], Awaitable[Any]]


class CaptureWorker:
    """Paces one device's source and feeds its encoder."""

    def __init__(self, *, device: DeviceConfig, max_in_flight: int = 2) -> None:
        self.device = device
        self.max_in_flight = max_in_flight
        self.source = SyntheticSource(
            width=device.width,
            height=device.height,
            scroll_px_per_frame=device.source.scroll_px_per_frame,
        )
        self.status = "idle"
        self.frames_captured = 0
        self.frames_sent = 0
        self.frames_encoded = 0
        self.dropped: dict[str, int] = {}
        self._in_flight = 0
        self._submit: Submit | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._captured_at: deque[float] = deque(maxlen=4 * device.fps)

    def set_encoder(self, submit: Submit | None) -> None:
        """Point the stream at an encoder (None: frames are dropped as `no_encoder`)."""
        self._submit = submit

    async def start(self, phase: float = 0.0) -> None:
        """Start capturing (idempotent).

        `phase` (0..1) delays the first frame by that fraction of a frame interval: the
        driver spreads the devices sharing an encoder over the interval so their frames
        do not all reach it at the same instant.
        """
        if self._task is None or self._task.done():
            self.status = "live"
            delay = (phase % 1.0) / self.device.fps
            self._task = asyncio.get_running_loop().create_task(self._run(delay))

    async def stop(self) -> None:
        """Stop capturing and wait for frames in flight (bounded; idempotent)."""
        self.status = "stopped"
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pending:
            await asyncio.wait(self._pending, timeout=2.0)

    def _drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        metrics.inc("frames_dropped", count, device=self.device.id, stage="capture", reason=reason)

    async def _run(self, delay: float) -> None:
        period = 1.0 / self.device.fps
        next_tick = time.monotonic() + delay
        while True:
            delay = next_tick - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            late = int((time.monotonic() - next_tick) / period)
            if late > 0:
                # The loop fell behind by whole frame intervals: those frames were never
                # captured. Count them so a starved capture actor is visible.
                self._drop("capture_late", late)
            next_tick += period * (1 + late)
            try:
                self._capture_one()
            except Exception:
                logger.exception("capture of %s failed; continuing", self.device.id)
                self._drop("capture_error")

    def _capture_one(self) -> None:
        frame = self.source.next_frame()
        self.frames_captured += 1
        self._captured_at.append(time.monotonic())
        metrics.inc("frames_captured", device=self.device.id)
        if self._submit is None:
            self._drop("no_encoder")
            return
        if self._in_flight >= self.max_in_flight:
            self._drop("backpressure")
            return
        self._in_flight += 1
        self.frames_sent += 1
        task = asyncio.get_running_loop().create_task(self._await_encoded(self._submit(frame)))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _await_encoded(self, result: Awaitable[Any]) -> None:
        try:
            await result
            self.frames_encoded += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - an encoder failure must not stop capture
            self._drop("encoder_error")
            logger.warning("encoding a frame of %s failed: %s", self.device.id, exc)
        finally:
            self._in_flight -= 1

    def fps(self) -> float:
        """Frames captured per second over the last few seconds."""
        stamps = self._captured_at
        if len(stamps) < 2 or time.monotonic() - stamps[-1] > 1.0:
            return 0.0
        return round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 2)

    def resources(self) -> dict[str, int]:
        return {**process_resources(), "frames_in_flight": self._in_flight}

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.device.id,
            "status": self.status,
            "frames_captured": self.frames_captured,
            "frames_sent": self.frames_sent,
            "frames_encoded": self.frames_encoded,
            "in_flight": self._in_flight,
            "dropped": dict(self.dropped),
            "fps": self.fps(),
        }


class CaptureActor(CaptureWorker):
    """The `capture:<device>` actor: a CaptureWorker that feeds an encoder actor."""

    def set_encoder_actor(self, encoder: Any) -> None:
        """Send frames to `encoder` (an EncoderActor handle), as object refs."""
        import ray

        device_id = self.device.id

        def submit(frame: RawFrame) -> Any:
            # Put once; the encoder reads it zero-copy on this node and the ref is
            # released as soon as the encode task ends (DESIGN decision 3).
            ref = ray.put(frame.data)
            return encoder.encode.remote(device_id, ref, frame.index, frame.capture_ms)

        self.set_encoder(submit)


def create_capture_actor(device: DeviceConfig, *, max_in_flight: int) -> Any:
    """Start the `capture:<device>` actor (not yet capturing: call `start`)."""
    import ray

    # The capture loop is light (one memcpy and one put per frame); the CPU request sits
    # with the encoders, so captures never wait for a CPU slot.
    return (
        ray.remote(CaptureActor)
        .options(name=f"capture:{device.id}", num_cpus=0, max_concurrency=64)
        .remote(device=device, max_in_flight=max_in_flight)
    )

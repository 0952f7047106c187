"""The driver: places the actors of one pipeline on Ray and takes them down again.

Runs in the driver process. Settings are resolved before this (configs.loader) and handed
to each actor as validated models. `start` and `stop` are idempotent, and `stop` is
bounded in time: it asks the actors to stop cleanly, then kills every actor it created.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.capture import create_capture_actor
from actors.encoder import create_encoder_actor
from actors.monitor import create_monitor_actor
from actors.pool import assign_streams
from configs.schema import Settings
from ingress.actor import create_ingress_actor

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


class PipelineError(RuntimeError):
    """The pipeline could not start; the message says which actor and why."""


@dataclass
class PipelineInfo:
    """Where the pipeline can be reached once started."""

    url: str
    port: int
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)


class Pipeline:
    """Ingress, encoder pool and one capture actor per device."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ingress: Any = None
        self.encoders: list[Any] = []
        self.captures: dict[str, Any] = {}
        self.monitor: Any = None
        self.info: PipelineInfo | None = None

    @property
    def actors(self) -> list[Any]:
        found = [a for a in (self.ingress, self.monitor) if a is not None]
        return found + list(self.encoders) + list(self.captures.values())

    def start(self) -> PipelineInfo:
        if self.info is not None:
            return self.info
        try:
            self.info = self._start()
        except BaseException:
            self.stop()
            raise
        return self.info

    def _start(self) -> PipelineInfo:
        s = self.settings
        self.ingress = create_ingress_actor(s.ingress)
        port = _get(self.ingress.start.remote(), "ingress")
        host = s.ingress.host
        url_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        url = f"http://{url_host}:{port}/"

        self.encoders = [
            create_encoder_actor(i, encoder=s.encoder, resources=s.pool.resources)
            for i in range(s.pool.workers)
        ]
        infos = [_get(e.info.remote(), f"encoder-{i}") for i, e in enumerate(self.encoders)]
        _get([e.set_ingress.remote(self.ingress) for e in self.encoders], "encoders")
        _get(
            [
                self.ingress.add_encoder.remote(info["name"], e)
                for info, e in zip(infos, self.encoders, strict=True)
            ],
            "ingress",
        )

        placement = assign_streams(
            [d.id for d in s.devices], s.pool.workers, s.pool.streams_per_worker
        )
        for device in s.devices:
            encoder = self.encoders[placement[device.id]]
            capture = create_capture_actor(device, max_in_flight=s.pool.max_in_flight)
            self.captures[device.id] = capture
            info = _get(encoder.open_stream.remote(device), f"encoder for {device.id}")
            _get(capture.set_encoder_actor.remote(encoder), f"capture:{device.id}")
            _get(
                self.ingress.add_device.remote(
                    device, capture=capture, encoder=encoder, encoder_info=info
                ),
                "ingress",
            )
        _get(
            self.ingress.set_pool.remote(
                s.pool.workers * s.pool.streams_per_worker, len(placement), 0
            ),
            "ingress",
        )
        count = max(len(self.captures), 1)
        _get(
            [c.start.remote(i / count) for i, c in enumerate(self.captures.values())],
            "capture actors",
        )
        self.monitor = create_monitor_actor(s.monitor)
        watched = {"ingress": self.ingress}
        watched.update({f"encoder-{i}": e for i, e in enumerate(self.encoders)})
        watched.update({f"capture:{d}": c for d, c in self.captures.items()})
        _get(
            [self.monitor.watch_actor.remote(name, handle) for name, handle in watched.items()],
            "monitor",
        )
        _get(self.monitor.start.remote(), "monitor")
        _get(self.ingress.set_monitor.remote(self.monitor), "ingress")
        _get(self.ingress.set_ready.remote(True), "ingress")
        logger.info(
            "pipeline started: %d devices, %d encoders, %s", len(s.devices), len(infos), url
        )
        return PipelineInfo(url=url, port=port, encoders={i["name"]: i for i in infos})

    def stop(self) -> None:
        """Stop capture, close viewer sessions, kill every actor started (idempotent)."""
        refs = [c.stop.remote() for c in self.captures.values()]
        if self.monitor is not None:
            refs.append(self.monitor.stop.remote())
        if self.ingress is not None:
            refs.append(self.ingress.stop.remote())
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT_S)
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - stop goes on whatever failed
                    logger.warning("an actor failed to stop cleanly: %s", exc)
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # noqa: BLE001
                logger.debug("kill failed: %s", exc)
        self.ingress = None
        self.monitor = None
        self.encoders = []
        self.captures = {}
        self.info = None


def _get(refs: Any, what: str) -> Any:
    try:
        return ray.get(refs, timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as exc:
        raise PipelineError(f"{what} did not answer within {START_TIMEOUT_S:.0f} s") from exc
    except ray.exceptions.RayActorError as exc:
        raise PipelineError(f"{what} failed to start: {_cause(exc)}") from exc
    except ray.exceptions.RayTaskError as exc:
        raise PipelineError(f"{what} failed: {_cause(exc)}") from exc


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc.__cause__
    text = str(cause or exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__

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
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.capture import create_capture_actor
from actors.monitor import create_monitor_actor
from actors.pool import create_pool_actor
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

    def __init__(self, settings: Settings, *, node_id: str | None = None) -> None:
        """`node_id`: where the ingress, pool, monitor and (by default) captures run;
        default: the driver's node (the viewer URL is that node's)."""
        self.settings = settings
        self.node_id = node_id
        self.ingress: Any = None
        self.pool: Any = None
        self.captures: dict[str, Any] = {}
        self.monitor: Any = None
        self.info: PipelineInfo | None = None

    @property
    def actors(self) -> list[Any]:
        found = [a for a in (self.ingress, self.monitor, self.pool) if a is not None]
        return found + list(self.captures.values())

    @property
    def encoders(self) -> list[Any]:
        """Handles of the encoders alive now (they come and go with the pool)."""
        if self.pool is None:
            return []
        return list(ray.get(self.pool.encoder_handles.remote(), timeout=10).values())

    def __enter__(self) -> Pipeline:
        """`with Pipeline(settings) as p:` starts it, and stops it however the block ends."""
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
        # The ingress, the pool, the monitor and captures without capture_resources run
        # on the driver's node: the viewer URL is this node's, and synthetic devices are
        # here. Encoders go wherever their resources are.
        # Hard affinity: a soft one lets zero-CPU actors drift to other nodes.
        here = NodeAffinitySchedulingStrategy(
            node_id=self.node_id or ray.get_runtime_context().get_node_id(), soft=False
        )
        self.ingress = create_ingress_actor(s.ingress, scheduling_strategy=here)
        port = _get(self.ingress.start.remote(), "ingress")
        host = s.ingress.host
        url_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        url = f"http://{url_host}:{port}/"

        self.pool = create_pool_actor(
            pool=s.pool,
            encoder=s.encoder,
            max_workers=s.max_encoders(),
            ingress=self.ingress,
            scheduling_strategy=here,
        )
        infos = _get(self.pool.start.remote(), "encoder pool")
        _get(self.ingress.attach_pool.remote(self.pool), "ingress")

        for device in s.devices:
            capture = create_capture_actor(
                device, max_in_flight=s.pool.max_in_flight, scheduling_strategy=here
            )
            self.captures[device.id] = capture
            _get(self.ingress.add_device.remote(device, capture=capture), f"capture:{device.id}")
            _get(capture.report_status_to.remote(self.ingress), f"capture:{device.id}")
            if device.passthrough:
                # The device's own H.264 goes to the ingress; no encoder is used.
                _get(capture.set_ingress.remote(self.ingress), f"capture:{device.id}")
                info = {"name": "passthrough", "node": None, "hwaccel": "device"}
                _get(self.ingress.set_encoder.remote(device.id, None, info), "ingress")
            else:
                _get(self.pool.add_stream.remote(device, capture), f"capture:{device.id}")
        count = max(len(self.captures), 1)
        _get(
            [c.start.remote(i / count) for i, c in enumerate(self.captures.values())],
            "capture actors",
        )
        self.monitor = create_monitor_actor(s.monitor, scheduling_strategy=here)
        watched: dict[str, Any] = {"ingress": self.ingress}
        watched.update({f"capture:{d}": c for d, c in self.captures.items()})
        _get(
            [self.monitor.watch_actor.remote(name, handle) for name, handle in watched.items()],
            "monitor",
        )
        _get(self.monitor.watch_pool.remote(self.pool), "monitor")
        _get(self.monitor.start.remote(), "monitor")
        _get(self.ingress.set_monitor.remote(self.monitor), "ingress")
        _get(self.ingress.set_ready.remote(True), "ingress")
        logger.info(
            "pipeline started: %d devices, %d encoders ready, %s", len(s.devices), len(infos), url
        )
        return PipelineInfo(url=url, port=port, encoders={i["name"]: i for i in infos})

    def stop(self) -> None:
        """Stop capture, close viewer sessions, kill every actor started (idempotent)."""
        refs = [c.stop.remote() for c in self.captures.values()]
        if self.pool is not None:
            refs.append(self.pool.shutdown.remote())
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
        self.pool = None
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

"""The pydantic schema of the whole configuration.

One `Settings` tree; every section is a `BaseModel` with `extra="forbid"`, so a misspelt
key is an error that names it instead of a silently ignored value. The loader
(`configs.loader`) fills it from YAML and the environment; the driver resolves it once
and hands the validated sections to the actors as keyword arguments.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSource(_Section):
    """A generated phone-like screen that carries the frame stamp of DESIGN.md."""

    kind: Literal["synthetic"] = "synthetic"
    scroll_px_per_frame: Annotated[int, Field(ge=0, le=256, multiple_of=2)] = Field(
        default=4,
        description="How far the content scrolls each frame (even, so chroma scrolls too).",
    )


class _AdbSource(_Section):
    serial: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:\-]+$",
        description="adb serial; host:port for a network device (adb connect is run first).",
    )
    adb_path: str = Field(default="adb", min_length=1, description="The adb binary.")


class AdbScreenrecordSource(_AdbSource):
    """`adb exec-out screenrecord --output-format=h264`: the device's own H.264."""

    kind: Literal["adb-screenrecord"] = "adb-screenrecord"
    mode: Literal["passthrough", "transcode"] = Field(
        default="passthrough",
        description="passthrough: the device's H.264 goes to viewers as is; transcode: "
        "decoded and re-encoded on an encoder actor to the configured size and bitrate.",
    )
    bit_rate_bps: Annotated[int, Field(ge=100_000, le=100_000_000)] = Field(
        default=4_000_000, description="screenrecord --bit-rate."
    )
    time_limit_s: Annotated[int, Field(ge=1, le=180)] = Field(
        default=180,
        description="screenrecord --time-limit; it is restarted at once when it ends.",
    )


class AdbScreencapSource(_AdbSource):
    """`adb exec-out screencap`: raw frames polled at the device's fps."""

    kind: Literal["adb-screencap"] = "adb-screencap"
    png: bool = Field(default=False, description="Ask for PNG (-p) instead of raw pixels.")
    refresh_s: Annotated[float, Field(gt=0, le=60)] = Field(
        default=1.0,
        description="Unchanged frames are skipped, but one is sent at least this often.",
    )


class MediaSource(_Section):
    """Anything PyAV opens: a file (looped), lavfi, x11grab, v4l2, RTSP."""

    kind: Literal["media"] = "media"
    url: str = Field(min_length=1, description="Path or URL, e.g. rtsp://... or testsrc.")
    format: str | None = Field(default=None, description="Input format, e.g. lavfi, x11grab, v4l2.")
    options: dict[str, str] = Field(
        default_factory=dict, description="Demuxer options, e.g. {rtsp_transport: tcp}."
    )
    loop: bool = Field(default=True, description="Start a file again at its end.")


SourceConfig = Annotated[
    SyntheticSource | AdbScreenrecordSource | AdbScreencapSource | MediaSource,
    Field(discriminator="kind"),
]


class DeviceConfig(_Section):
    """One device to capture."""

    id: str = Field(pattern=DEVICE_ID_PATTERN, description="Unique id, used in URLs.")
    source: SourceConfig = Field(
        default_factory=SyntheticSource, description="Where the frames come from."
    )
    width: Annotated[int, Field(ge=16, le=4096, multiple_of=2)] = Field(
        default=720, description="Frame width in pixels (even)."
    )
    height: Annotated[int, Field(ge=16, le=4096, multiple_of=2)] = Field(
        default=1280, description="Frame height in pixels (even)."
    )
    fps: Annotated[int, Field(ge=1, le=120)] = Field(default=30, description="Frames per second.")
    capture_resources: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="Ray resources the capture actor asks for, to place it on the node "
        "that reaches the device (e.g. {rack-3: 0.01}); default: the driver's node.",
    )

    @property
    def passthrough(self) -> bool:
        """The device's own H.264 goes to the viewers as is (no encoder actor)."""
        source = self.source
        return isinstance(source, AdbScreenrecordSource) and source.mode == "passthrough"


class EncoderConfig(_Section):
    """How every stream is encoded."""

    codec: Literal["h264"] = Field(default="h264", description="Output codec (WebRTC H.264).")
    hwaccel: Literal["auto", "nvenc", "qsv", "vaapi", "libx264"] = Field(
        default="auto",
        description="Encoder backend; auto takes the first of nvenc, qsv, vaapi, libx264 "
        "that opens on the encoder's node.",
    )
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = Field(
        default="ultrafast", description="libx264 preset (mapped for hardware backends)."
    )
    bitrate_bps: Annotated[int, Field(ge=100_000, le=50_000_000)] = Field(
        default=2_500_000, description="Target bitrate per stream in bits per second."
    )
    keyframe_interval: Annotated[int, Field(ge=1, le=600)] = Field(
        default=60, description="Frames between IDR frames."
    )
    profile: Literal["constrained_baseline"] = Field(
        default="constrained_baseline",
        description="H.264 profile; Chromium and aiortc meet on Constrained Baseline.",
    )
    min_bitrate_bps: Annotated[int, Field(ge=50_000, le=50_000_000)] = Field(
        default=150_000, description="Lowest bitrate viewers' feedback may set."
    )
    max_bitrate_bps: Annotated[int, Field(ge=50_000, le=50_000_000)] = Field(
        default=8_000_000, description="Highest bitrate viewers' feedback may set."
    )
    threads: Annotated[int, Field(ge=0, le=64)] = Field(
        default=1,
        description="libx264 threads per stream (0 = auto). The pool parallelises across "
        "streams, so one thread per stream is the efficient default.",
    )

    @model_validator(mode="after")
    def _bitrate_range(self) -> EncoderConfig:
        if not self.min_bitrate_bps <= self.bitrate_bps <= self.max_bitrate_bps:
            raise ValueError(
                f"encoder.bitrate_bps ({self.bitrate_bps}) must lie within "
                f"encoder.min_bitrate_bps ({self.min_bitrate_bps}) and "
                f"encoder.max_bitrate_bps ({self.max_bitrate_bps})"
            )
        return self

    def clamp_bitrate(self, bps: int) -> int:
        return max(self.min_bitrate_bps, min(self.max_bitrate_bps, int(bps)))


class ActorResources(_Section):
    """Ray resources requested by each encoder actor."""

    num_cpus: Annotated[float, Field(ge=0)] = Field(default=1.0, description="CPU slots.")
    num_gpus: Annotated[float, Field(ge=0)] = Field(default=0.0, description="GPU fraction.")
    custom: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="Custom resources, e.g. {nvenc: 1}."
    )


class PoolConfig(_Section):
    """The pool of encoder actors."""

    min_workers: Annotated[int, Field(ge=0, le=1024)] = Field(
        default=2,
        description="Encoder actors started at once and kept (replaced when one dies).",
    )
    max_workers: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None,
        description="Most encoder actors; the pool starts more (up to this) while streams "
        "wait for capacity. Default: enough for every device, at least min_workers.",
    )
    streams_per_worker: PositiveInt = Field(
        default=4, description="Most streams one encoder actor carries."
    )
    max_in_flight: Annotated[int, Field(ge=1, le=16)] = Field(
        default=2, description="Raw frames a capture actor keeps in flight to its encoder."
    )
    resources: ActorResources = Field(default_factory=ActorResources)


class IngressConfig(_Section):
    """The HTTP / WebRTC ingress."""

    host: str = Field(default="127.0.0.1", min_length=1, description="Bind address.")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=8080, description="Bind port (0 = any free port)."
    )
    token: str | None = Field(
        default=None, min_length=8, description="Bearer token every /api/* call must carry."
    )
    view_token: str | None = Field(
        default=None,
        min_length=8,
        description="A second bearer token that may watch but not send input.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed to call /api/* from another site (none: CORS off).",
    )
    max_viewers_per_device: PositiveInt = Field(default=16, description="Viewers per device.")
    connect_timeout_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=20.0, description="A session not connected this long after its answer closes."
    )
    idle_timeout_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=10.0,
        description="A connected session whose viewer sends no RTCP this long closes "
        "(a viewer that vanished without a goodbye).",
    )
    input_rate_per_s: Annotated[float, Field(gt=0, le=1000)] = Field(
        default=30.0, description="Input events per second per session (burst: 2 s worth)."
    )
    viewer_queue: Annotated[int, Field(ge=2, le=1000)] = Field(
        default=60, description="Encoded frames a viewer may fall behind before it skips."
    )


class MonitorConfig(_Section):
    """The leak monitor."""

    interval_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=10.0, description="Seconds between samples."
    )
    growth_percent: Annotated[float, Field(gt=0)] = Field(
        default=50.0, description="Growth over baseline that raises a warning."
    )


class Settings(BaseSettings):
    """The whole configuration.

    Sources, highest first: `CPM__<SECTION>__<FIELD>` environment variables, then the
    values the loader passes in (the YAML file with the old service's variable names
    applied on top), then the defaults above.
    """

    model_config = SettingsConfigDict(
        env_prefix="CPM__",
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    devices: list[DeviceConfig] = Field(default_factory=list, description="Devices to stream.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @field_validator("devices")
    @classmethod
    def _unique_ids(cls, devices: list[DeviceConfig]) -> list[DeviceConfig]:
        seen: set[str] = set()
        for device in devices:
            if device.id in seen:
                raise ValueError(f"device id {device.id!r} is used twice; ids must be unique")
            seen.add(device.id)
        return devices

    @model_validator(mode="after")
    def _pool_bounds(self) -> Settings:
        pool = self.pool
        if pool.max_workers is not None and pool.max_workers < pool.min_workers:
            raise ValueError(
                f"pool.max_workers ({pool.max_workers}) must be at least pool.min_workers "
                f"({pool.min_workers})"
            )
        return self

    def max_encoders(self) -> int:
        """pool.max_workers, or by default enough encoders for every device."""
        if self.pool.max_workers is not None:
            return self.pool.max_workers
        needed = -(-len(self.devices) // self.pool.streams_per_worker)
        return max(self.pool.min_workers, needed, 1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env or secrets files: what configures a node is the YAML and its environment.
        return (env_settings, init_settings)

"""Configuration: the pydantic schema, its loader, and ready YAML files."""

from configs.loader import ConfigError, load_settings
from configs.schema import (
    ActorResources,
    AdbScreencapSource,
    AdbScreenrecordSource,
    DeviceConfig,
    EncoderConfig,
    IngressConfig,
    MediaSource,
    MonitorConfig,
    PoolConfig,
    Settings,
    SyntheticSource,
)

__all__ = [
    "ActorResources",
    "AdbScreencapSource",
    "AdbScreenrecordSource",
    "MediaSource",
    "ConfigError",
    "DeviceConfig",
    "EncoderConfig",
    "IngressConfig",
    "MonitorConfig",
    "PoolConfig",
    "Settings",
    "SyntheticSource",
    "load_settings",
]

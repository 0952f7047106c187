"""Configuration: the pydantic schema, its loader, and ready YAML files."""

from configs.loader import ConfigError, load_settings
from configs.schema import (
    ActorResources,
    DeviceConfig,
    EncoderConfig,
    IngressConfig,
    MonitorConfig,
    PoolConfig,
    Settings,
    SyntheticSource,
)

__all__ = [
    "ActorResources",
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

"""Load the configuration: YAML file, then the environment.

Precedence, highest first:

1. `CPM__<SECTION>__<FIELD>` (any field, nested with `__`, e.g. `CPM__INGRESS__PORT=9000`);
2. the old Go service's names: `WORKER_POOL_SIZE`, `ENCODER_HWACCEL`, `ENCODER_PRESET`,
   `VIDEO_ENCODER_TYPE`, `CAPTURE_MODE` (the source kind of every device that names none);
3. the YAML file;
4. the schema's defaults.

Any invalid value raises `ConfigError` with one line per problem, each naming the field
(and the variable it came from, where it came from the environment).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from configs.schema import Settings

ENV_PREFIX = "CPM__"

#: The old service's variable -> (section, field) it sets.
LEGACY_ENV: dict[str, tuple[str, str]] = {
    "WORKER_POOL_SIZE": ("pool", "min_workers"),
    "ENCODER_HWACCEL": ("encoder", "hwaccel"),
    "ENCODER_PRESET": ("encoder", "preset"),
    "VIDEO_ENCODER_TYPE": ("encoder", "codec"),
}

#: Values the old service used for VIDEO_ENCODER_TYPE and CAPTURE_MODE.
_CODEC_ALIASES = {"h264": "h264", "avc": "h264", "x264": "h264", "libx264": "h264"}
_CAPTURE_ALIASES = {
    "screenrecord": "adb-screenrecord",
    "screencap": "adb-screencap",
}


class ConfigError(Exception):
    """The configuration is invalid; the message names every offending field."""


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read `path` (YAML, optional), apply the environment, validate.

    `environ` defaults to `os.environ`; the nested `CPM__` variables are always read from
    `os.environ` by pydantic-settings, so tests set them there.
    """
    env = os.environ if environ is None else environ
    data = _read_yaml(path) if path is not None else {}
    origins: dict[str, str] = {}
    _apply_legacy_env(data, env, origins)
    # pydantic-settings reads the CPM__ variables from the process environment.
    _check_nested_env_names(os.environ)
    for key in os.environ:
        if key.upper().startswith(ENV_PREFIX):
            origins[key.upper()[len(ENV_PREFIX) :].lower().replace("__", ".")] = key.upper()
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origins)) from exc


def _read_yaml(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {str(file)!r}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{file}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def _apply_legacy_env(
    data: dict[str, Any], env: Mapping[str, str], origins: dict[str, str]
) -> None:
    for name, (section, field) in LEGACY_ENV.items():
        if name not in env:
            continue
        value: str = env[name]
        if name == "VIDEO_ENCODER_TYPE":
            value = _CODEC_ALIASES.get(value.strip().lower(), value)
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: must be a mapping, got {type(target).__name__}")
        target[field] = value
        origins[f"{section}.{field}"] = name
    mode = env.get("CAPTURE_MODE")
    if mode is None:
        return
    kind = _CAPTURE_ALIASES.get(mode.strip().lower(), mode.strip().lower())
    devices = data.get("devices") or []
    if not isinstance(devices, list):
        return  # the schema reports it
    for index, device in enumerate(devices):
        if isinstance(device, dict) and "source" not in device:
            device["source"] = {"kind": kind}
            origins[f"devices.{index}.source"] = "CAPTURE_MODE"


def _check_nested_env_names(env: Mapping[str, str]) -> None:
    """A misspelt `CPM__` section would be ignored silently by pydantic-settings."""
    sections = set(Settings.model_fields)
    for key in env:
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        section = upper[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if section not in sections:
            raise ConfigError(
                f"{upper}: unknown section {section!r}; allowed: {', '.join(sorted(sections))}"
            )


def format_validation_error(exc: ValidationError, origins: Mapping[str, str] | None = None) -> str:
    origins = origins or {}
    lines = [f"invalid configuration ({exc.error_count()} problem(s)):"]
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        where = _origin(loc, origins)
        got = ""
        if error["type"] != "missing" and "input" in error:
            got = f" (got {error['input']!r})"
        lines.append(f"  {loc or '<root>'}: {error['msg']}{got}{where}")
    return "\n".join(lines)


def _origin(loc: str, origins: Mapping[str, str]) -> str:
    best = ""
    for path in origins:
        if (loc == path or loc.startswith(path + ".")) and len(path) > len(best):
            best = path
    return f" [from {origins[best]}]" if best else ""

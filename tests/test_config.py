"""Configuration: every source, its precedence, and errors that name the field."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from configs.loader import ConfigError, load_settings

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("CPM__"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_demo_yaml_has_four_portrait_synthetic_devices() -> None:
    s = load_settings(DEMO, environ={})
    assert [d.id for d in s.devices] == ["phone-1", "phone-2", "phone-3", "phone-4"]
    assert {(d.width, d.height, d.fps, d.source.kind) for d in s.devices} == {
        (720, 1280, 30, "synthetic")
    }


def test_defaults_without_file() -> None:
    s = load_settings(None, environ={})
    assert s.ingress.host == "127.0.0.1" and s.ingress.port == 8080
    assert s.encoder.hwaccel == "auto" and s.encoder.preset == "ultrafast"
    assert s.devices == []


def test_yaml_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        devices: [{id: a, width: 540, height: 960, fps: 24}]
        encoder: {bitrate_bps: 1000000, keyframe_interval: 30}
        pool: {min_workers: 3, resources: {num_gpus: 0.25, custom: {nvenc: 1}}}
        ingress: {port: 9100, token: secret-token}
        monitor: {interval_s: 5, growth_percent: 20}
        """,
    )
    s = load_settings(path, environ={})
    assert (s.devices[0].width, s.devices[0].height, s.devices[0].fps) == (540, 960, 24)
    assert s.encoder.bitrate_bps == 1_000_000 and s.encoder.keyframe_interval == 30
    assert s.pool.min_workers == 3 and s.pool.resources.custom == {"nvenc": 1}
    assert s.ingress.port == 9100 and s.ingress.token == "secret-token"
    assert s.monitor.interval_s == 5


def test_nested_env_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "ingress: {port: 9100}\nencoder: {preset: fast}\n")
    monkeypatch.setenv("CPM__INGRESS__PORT", "9000")
    monkeypatch.setenv("CPM__POOL__RESOURCES__NUM_GPUS", "0.5")
    s = load_settings(path, environ={})
    assert s.ingress.port == 9000
    assert s.pool.resources.num_gpus == 0.5
    assert s.encoder.preset == "fast"  # untouched by the environment


def test_old_service_names_override_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        devices: [{id: a}, {id: b, source: {kind: synthetic, scroll_px_per_frame: 2}}]
        pool: {min_workers: 1}
        encoder: {hwaccel: auto, preset: fast}
        """,
    )
    env = {
        "WORKER_POOL_SIZE": "4",
        "ENCODER_HWACCEL": "libx264",
        "ENCODER_PRESET": "veryfast",
        "VIDEO_ENCODER_TYPE": "H264",
        "CAPTURE_MODE": "synthetic",
    }
    s = load_settings(path, environ=env)
    assert s.pool.min_workers == 4
    assert s.encoder.hwaccel == "libx264"
    assert s.encoder.preset == "veryfast"
    assert s.encoder.codec == "h264"
    assert s.devices[0].source.kind == "synthetic"
    assert s.devices[1].source.scroll_px_per_frame == 2  # a device's own source wins


def test_nested_env_beats_old_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPM__POOL__MIN_WORKERS", "6")
    s = load_settings(None, environ={"WORKER_POOL_SIZE": "3"})
    assert s.pool.min_workers == 6


@pytest.mark.parametrize(
    ("yaml_text", "env", "expected"),
    [
        ("ingress: {port: 70000}", {}, "ingress.port"),
        ("encoder: {hwaccel: cuda}", {}, "encoder.hwaccel"),
        ("devices: [{id: a, width: 721}]", {}, "devices.0.width"),
        ("devices: [{id: a}, {id: a}]", {}, "used twice"),
        ("ingress: {prot: 80}", {}, "ingress.prot"),
        ("", {"ENCODER_PRESET": "slowest"}, "encoder.preset"),
        ("", {"WORKER_POOL_SIZE": "many"}, "[from WORKER_POOL_SIZE]"),
        ("devices: [{id: a}]", {"CAPTURE_MODE": "camera"}, "[from CAPTURE_MODE]"),
    ],
)
def test_invalid_values_name_the_field(
    tmp_path: Path, yaml_text: str, env: dict[str, str], expected: str
) -> None:
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=env)
    assert expected in str(info.value)


def test_invalid_nested_env_names_field_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPM__INGRESS__PORT", "not-a-port")
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={})
    assert "ingress.port" in str(info.value) and "CPM__INGRESS__PORT" in str(info.value)


def test_misspelt_env_section_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPM__INGRES__PORT", "9000")
    with pytest.raises(ConfigError, match="CPM__INGRES__PORT: unknown section 'ingres'"):
        load_settings(None, environ={})


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "devices: [\n"), environ={})
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"), environ={})


def test_cli_stops_on_invalid_config_with_status_2_before_ray(tmp_path: Path) -> None:
    path = write(tmp_path, "devices: [{id: a, fps: 500}]\n")
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "devices.0.fps" in done.stderr
    assert "Started a local Ray" not in done.stderr + done.stdout

"""Every shipped `ray up` file passes Ray's own cluster-config validation; a broken one
is rejected with Ray's error. The head's pipeline configuration loads."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from configs.loader import load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = sorted((ROOT / "cluster" / "deploy").glob("*.yaml"))


def load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def test_there_are_cloud_and_onprem_files() -> None:
    assert {p.name for p in DEPLOY} >= {"aws-gpu.yaml", "onprem.yaml"}


@pytest.mark.parametrize("path", DEPLOY, ids=lambda p: p.name)
def test_ray_accepts_the_file(path: Path) -> None:
    config = load(path)
    validate_config(prepare_config(copy.deepcopy(config)))
    commands = " ".join(config["head_start_ray_commands"])
    assert "cloudphone-media run" in commands and "--address auto" in commands
    assert any("pip install -e ~/cloudphone-media" in c for c in config["setup_commands"])


def test_gpu_workers_carry_nvenc_resources() -> None:
    types = load(ROOT / "cluster" / "deploy" / "aws-gpu.yaml")["available_node_types"]
    gpu = {name: t for name, t in types.items() if name != "head"}
    assert {t["node_config"]["InstanceType"] for t in gpu.values()} >= {"g4dn.xlarge", "g6.xlarge"}
    assert all(t["resources"]["nvenc"] > 0 for t in gpu.values())


@pytest.mark.parametrize(
    ("breakage", "mentions"),
    [
        (lambda c: c.update(max_workers="many"), "many"),
        (lambda c: c.update(no_such_field=1), "no_such_field"),
        (lambda c: c["provider"].pop("type"), "type"),
    ],
)
def test_a_broken_file_is_rejected_with_rays_error(breakage: Any, mentions: str) -> None:
    config = load(ROOT / "cluster" / "deploy" / "aws-gpu.yaml")
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, KeyError, ValueError)) as info:
        validate_config(prepare_config(config))
    assert mentions in str(info.value)


def test_the_heads_pipeline_config_loads() -> None:
    settings = load_settings(ROOT / "configs" / "cluster.yaml", environ={})
    assert settings.pool.resources.custom == {"nvenc": 1}
    assert settings.ingress.host == "0.0.0.0"

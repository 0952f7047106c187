"""The shipped Prometheus and Grafana files parse and speak only of metrics we export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from actors.metrics import _SPECS

MONITORING = Path(__file__).resolve().parents[1] / "cluster" / "monitoring"


def exported_names() -> set[str]:
    names = set()
    for name, (kind, _desc, _tags) in _SPECS.items():
        base = f"ray_cpm_{name}"
        if kind == "counter":
            names.add(base + "_total")
        elif kind == "histogram":
            names |= {base + "_bucket", base + "_count", base + "_sum"}
        else:
            names.add(base)
    return names


def test_grafana_dashboard_queries_exported_metrics() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    used = {m for e in exprs for m in re.findall(r"ray_cpm_\w+", e)}
    assert used, exprs
    assert used <= exported_names(), used - exported_names()
    # Every metric of the pipeline has a panel.
    assert {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in used} == {
        f"ray_cpm_{n}" for n in _SPECS
    }


def test_prometheus_config_scrapes_rays_service_discovery() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["file_sd_configs"][0]["files"][0].endswith("prom_metrics_service_discovery.json")

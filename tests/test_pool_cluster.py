"""The encoder pool on a three-node `ray.cluster_utils.Cluster` with fake NVENC resources.

Placement follows resources and locality, an NVENC cap holds, the stream over the cap is
`pending` and starts when a node with capacity joins, and raw bytes cross nodes only for
the stream whose node has no capacity left.

Layout (every node is this machine; each is a Ray node of its own):
- head: the driver, ingress, pool, monitor; no `nvenc`;
- node B: `nvenc: 2`, `rack_b` (captures of b-0 and b-1);
- node C: `nvenc: 1`, `rack_c` (captures of c-0 and c-1).
Each encoder asks for `nvenc: 1` and carries one stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.pipeline import Pipeline
from configs.schema import Settings
from tests.conftest import head_node_id, wait_for


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    b = c.add_node(num_cpus=1, resources={"nvenc": 2, "rack_b": 1})
    cc = c.add_node(num_cpus=1, resources={"nvenc": 1, "rack_c": 1})
    ray.init(address=c.address, namespace="cpm-pool")
    c.wait_for_nodes()
    try:
        yield {"cluster": c, "b": b.node_id, "c": cc.node_id}
    finally:
        ray.shutdown()
        c.shutdown()


def pool_settings() -> Settings:
    def device(name: str, rack: str) -> dict[str, Any]:
        return {"id": name, "fps": 15, "capture_resources": {rack: 0.01}}

    return Settings.model_validate(
        {
            "devices": [
                device("b-0", "rack_b"),
                device("b-1", "rack_b"),
                device("c-0", "rack_c"),
                device("c-1", "rack_c"),
            ],
            "pool": {
                "min_workers": 0,
                "max_workers": 4,
                "streams_per_worker": 1,
                "resources": {"num_cpus": 0, "custom": {"nvenc": 1}},
            },
            "ingress": {"port": 0},
            "monitor": {"interval_s": 5},
        }
    )


def pool_stats(pipeline: Pipeline) -> dict[str, Any]:
    return ray.get(pipeline.pool.stats.remote(), timeout=10)


def test_placement_follows_resources_and_locality(cluster: dict[str, Any]) -> None:
    pipeline = Pipeline(pool_settings(), node_id=head_node_id())
    try:
        pipeline.start()

        def three_assigned() -> dict[str, Any] | None:
            streams = pool_stats(pipeline)["streams"]
            assigned = [s for s in streams.values() if s["status"] == "assigned"]
            return streams if len(assigned) == 3 else None

        streams = wait_for(three_assigned, 60, "three streams assigned")
        # B has room for two encoders (nvenc: 2), C for one: the streams whose capture
        # runs there get an encoder on the same node.
        assert streams["b-0"]["node_id"] == cluster["b"]
        assert streams["b-1"]["node_id"] == cluster["b"]
        on_c = [d for d in ("c-0", "c-1") if streams[d]["status"] == "assigned"]
        assert len(on_c) == 1 and streams[on_c[0]]["node_id"] == cluster["c"]
        waiting = "c-1" if on_c == ["c-0"] else "c-0"
        # The NVENC cap holds: the fourth stream waits, visibly.
        assert streams[waiting]["status"] == "pending"
        devices = {d["id"]: d for d in _devices(pipeline)}
        assert devices[waiting]["status"] == "pending"
        assert ray.get(pipeline.ingress.stats.remote())["pool"]["pending_streams"] == 1
        # Local streams send no raw bytes across nodes.
        stats = ray.get(pipeline.ingress.stats.remote())["devices"]
        assert stats["b-0"]["raw_bytes_cross_node"] == 0
        assert stats[on_c[0]]["raw_bytes_cross_node"] == 0

        # Capacity appears: a node with one more NVENC session joins.
        d = cluster["cluster"].add_node(num_cpus=1, resources={"nvenc": 1})

        def started() -> dict[str, Any] | None:
            s = pool_stats(pipeline)["streams"][waiting]
            return s if s["status"] == "assigned" else None

        moved = wait_for(started, 60, f"{waiting} to start on the new node")
        assert moved["node_id"] == d.node_id
        wait_for(
            lambda: (
                ray.get(pipeline.ingress.stats.remote())["devices"][waiting]["raw_bytes_cross_node"]
                > 0
            ),
            20,
            "raw bytes counted across nodes",
        )
        wait_for(
            lambda: {x["status"] for x in _devices(pipeline)} == {"live"}, 30, "all devices live"
        )
    finally:
        pipeline.stop()


def _devices(pipeline: Pipeline) -> list[dict[str, Any]]:
    import json
    import urllib.request

    assert pipeline.info is not None
    with urllib.request.urlopen(pipeline.info.url + "api/devices", timeout=10) as r:
        return list(json.loads(r.read()))

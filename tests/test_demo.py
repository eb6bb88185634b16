"""`make demo`'s command end to end: up the embedded default fleet, run the main job, tear down."""

from __future__ import annotations

import pytest

from edgeray import cluster
from edgeray.serve.engines import vllm_available
from edgeray.topology import load_topology, resolve_topology_path

from .conftest import run_cli


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(660)
def test_demo_places_one_actor_per_region_and_cleans_up(edgeray_home):
    topo = load_topology(resolve_topology_path("local"))
    out = run_cli("demo", "--name", "t-demo", timeout=640)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.count("│") >= 6]
    landed = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("│").split("│")]
        landed[cells[0]] = cells
    assert set(landed) == set(topo.regions)
    for region, (wanted, got, tier, node, _pid, ok) in landed.items():
        assert got == wanted == region and ok == "yes"
        assert tier == topo.regions[region].tier.value
        assert node in {n.name for n in topo.regions[region].nodes}
    # It ends by serving the trained checkpoint and asking from every region: served in-region, on one of
    # the region's nodes, by vLLM where it is installed.
    served = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 10 and fields[0] in topo.regions and fields[1] in topo.regions:
            served[fields[0]] = fields
    assert set(served) == set(topo.regions), out.stdout[-3000:]
    engine = "vllm" if vllm_available() else "torch"
    for region, fields in served.items():
        assert fields[1] == region and fields[2] in {n.name for n in topo.regions[region].nodes}
        assert fields[3] == engine
    assert "every region serving after" in out.stdout
    assert "t-demo" not in cluster.list_clusters()
    assert "tore down t-demo" in out.stdout

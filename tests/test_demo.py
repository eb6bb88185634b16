"""`make demo`'s command end to end: up the embedded default fleet, run the main job, tear down."""

from __future__ import annotations

import json
import shutil

import pytest

from edgeray import cluster
from edgeray.serve.engines import vllm_available
from edgeray.topology import load_topology, resolve_topology_path

from .conftest import ROOT, run_cli


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(660)
def test_demo_places_one_actor_per_region_and_cleans_up(edgeray_home, tmp_path):
    topo = load_topology(resolve_topology_path("local"))
    report = tmp_path / "demo.json"
    shutil.rmtree(ROOT / "runs" / "t-demo", ignore_errors=True)  # this test's own run directory
    out = run_cli("demo", "--name", "t-demo", "--json", str(report), timeout=640)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(report.read_text())
    placed = {r["wanted"]: r for r in result["placement"]}
    assert set(placed) == set(topo.regions)
    for region, r in placed.items():
        assert r["ok"] and r["region"] == region, r
        assert r["tier"] == topo.regions[region].tier.value
        assert r["node"] in {n.name for n in topo.regions[region].nodes}
    training = result["training"]
    assert training["steps"] == 40 and training["final_loss"] < training["initial_loss"]
    assert training["bytes_by_class"].get("inter-region", 0) > 0
    # It ends by serving the trained checkpoint and asking from every region: served in-region, on one of
    # the region's nodes, by vLLM where it is installed.
    engine = "vllm" if vllm_available() else "torch"
    served = {a["asked_from"]: a for a in result["serving"]}
    assert set(served) == set(topo.regions)
    for region, a in served.items():
        assert a["status"] == 200 and a["text"], a
        assert a["region"] == region and a["node"] in {n.name for n in topo.regions[region].nodes}
        assert a["engine"] == engine
    assert "every region serving after" in out.stdout
    # Monitored where Prometheus is installed (as `make demo` is): 30 s of traffic from every region, then
    # every panel of every dashboard has data and is drawn.
    if shutil.which("prometheus"):
        monitor = ROOT / "runs" / "t-demo" / "monitor"
        panels = json.loads((monitor / "panels.json").read_text())
        assert {p["dashboard"] for p in panels} >= {"edgeray-training", "edgeray-serving", "edgeray-fleet"}
        assert [p["panel"] for p in panels if not p["has_data"]] == []
        assert f"{len(panels)}/{len(panels)} panels have data" in out.stdout
        assert len(list((monitor / "dashboards").glob("*.png"))) == 3
    assert "t-demo" not in cluster.list_clusters()
    assert "tore down t-demo" in out.stdout

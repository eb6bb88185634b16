"""A real labelled multi-raylet Ray cluster on loopback: up, placement by label, attach, job submit, down."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import psutil
import pytest
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from edgeray import cluster
from edgeray.placement import (
    PlacementError,
    pin,
    placement_group_on,
    region_placement_group,
    reserve,
    selector,
    wait_ready,
    where,
)
from edgeray.topology import load_topology, loads_topology

from .conftest import ROOT, run_bin, run_cli

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TINY = """\
name: tiny
regions:
  - name: eu
    tier: regional
    nodes: [{name: eu-1, cpus: 2, memory_gb: 1}]
  - name: us
    tier: micro
    nodes: [{name: us-1, cpus: 1, memory_gb: 1}, {name: us-2, cpus: 1, memory_gb: 1, accelerator: npu}]
links:
  - {between: [eu, us], latency_ms: 40}
"""
NAME = "t-tiny"


@pytest.fixture(scope="module")
def tiny(edgeray_home, tmp_path_factory):
    path = tmp_path_factory.mktemp("topo") / "tiny.yaml"
    path.write_text(TINY)
    topo = load_topology(path)
    # started from a shell still pointed at another (--wan) cluster: none of that may reach this one's raylets
    leaked = {"EDGERAY_WAN": "elsewhere", "EDGERAY_TOPOLOGY": "/elsewhere.yaml", "EDGERAY_SERVE_PORT": "1"}
    saved = {k: os.environ.get(k) for k in leaked}
    os.environ.update(leaked)
    try:
        state = cluster.up(topo, name=NAME)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield topo, state
    cluster.down(NAME)
    assert not cluster.session_processes(state.sessions["head"])


@pytest.fixture(scope="module")
def driver(tiny):
    """This test process as a Ray driver of the tiny cluster; the environment is restored afterwards.
    Ray keeps one cluster's auth token per process, so this module runs before any module that drives the
    session's shared cluster (files sort after test_cluster.py)."""
    assert not ray.is_initialized(), (
        "test_cluster.py must run before the shared cluster is started: name cluster-test modules to sort "
        "after it"
    )
    _, state = tiny
    saved = dict(os.environ)
    cluster.use_cluster(state)
    ray.init(logging_level="ERROR", log_to_driver=False)
    yield state
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@ray.remote(num_cpus=0)
class Where:
    def labels(self):
        return where()


def _landed(actor) -> dict:
    return ray.get(actor.labels.remote(), timeout=30)


def test_every_topology_node_is_a_live_raylet_with_its_labels(tiny):
    topo, state = tiny
    nodes = cluster.probe_nodes(state.address, state.env())
    assert len([n for n in nodes if n["alive"]]) == len(topo.nodes) + 1  # + head
    assert cluster.missing_labels(topo, nodes) == {}
    by_name = {n["labels"].get("edgeray.io/node"): n for n in nodes}
    assert by_name["eu-1"]["resources"]["CPU"] == 2
    assert by_name["us-2"]["labels"]["edgeray.io/accelerator"] == "npu"
    head = [n for n in nodes if n["labels"].get("edgeray.io/role") == "head"]
    assert len(head) == 1 and head[0]["resources"].get("CPU", 0) == 0


def test_status_command_prints_every_node(tiny):
    topo, _ = tiny
    out = run_cli("status", "--name", NAME)
    assert out.returncode == 0, out.stderr
    for node in topo.iter_nodes():
        assert node.name in out.stdout and node.region in out.stdout
    assert "missing" not in out.stdout


@pytest.mark.timeout(120)
def test_actors_pinned_to_each_region_land_on_that_regions_nodes(tiny, driver):
    topo, _ = tiny
    for region in topo.regions.values():
        actors = [pin(Where, region=region.name).remote() for _ in range(4)]
        wait_ready(actors, timeout_s=60)
        for actor in actors:
            got = _landed(actor)
            assert got["edgeray.io/region"] == region.name
            assert got["edgeray.io/node"] in {n.name for n in region.nodes}
    on_node = pin(Where, node="us-2").remote()
    assert _landed(on_node)["edgeray.io/node"] == "us-2"
    by_tier = pin(Where, tier="regional").remote()
    assert _landed(by_tier)["edgeray.io/node"] == "eu-1"


@pytest.mark.timeout(120)
def test_region_placement_group_strict_spread_uses_each_region_node(tiny, driver):
    pg = region_placement_group("us", [{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD", timeout_s=60)
    try:
        actors = [
            Where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
            for i in range(2)
        ]
        nodes = sorted(_landed(a)["edgeray.io/node"] for a in actors)
        assert nodes == ["us-1", "us-2"]
    finally:
        ray.util.remove_placement_group(pg)


@pytest.mark.timeout(30)
def test_unsatisfiable_selector_fails_with_what_exists(tiny, driver):
    with pytest.raises(PlacementError) as info:
        pin(Where, region="mars")
    message = str(info.value)
    assert "mars" in message and "'eu'" in message and "'us'" in message
    with pytest.raises(PlacementError, match="can hold"):
        pin(Where, region="us", num_cpus=4)
    with pytest.raises(PlacementError, match="distinct nodes"):
        region_placement_group("eu", [{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")


@pytest.mark.timeout(60)
def test_placement_group_wait_is_bounded_and_cleans_up(tiny, driver):
    hog = region_placement_group("eu", [{"CPU": 2}], timeout_s=30)  # takes all of eu-1
    try:
        with pytest.raises(PlacementError, match="not placed within 2 s"):
            placement_group_on([selector(region="eu")], [{"CPU": 2}], timeout_s=2)
        pending = [p for p in ray.util.placement_group_table().values() if p["state"] == "PENDING"]
        assert pending == []  # the timed-out group was removed, not left to grab the node later
    finally:
        ray.util.remove_placement_group(hog)


@ray.remote(num_cpus=0)
class Cpus:
    def held(self):
        return where()["edgeray.io/node"], ray.get_runtime_context().get_assigned_resources().get("CPU")


@pytest.mark.timeout(90)
def test_a_reservation_holds_its_cpus_all_or_nothing_and_refuses_what_cannot_fit(tiny, driver):
    with pytest.raises(PlacementError, match=r"2 actors need 2 CPUs on us-1, which offers 1"):
        reserve([("us-1", 1), ("us-1", 1)], what="too many")
    held = reserve([("eu-1", 1), ("us-1", 1), ("eu-1", 1)], what="first run", timeout_s=30)
    try:
        actors = [held.pin(Cpus, slot).remote() for slot in range(3)]
        want = [("eu-1", 1.0), ("us-1", 1.0), ("eu-1", 1.0)]  # each actor on its slot's node, with its CPU
        assert ray.get([a.held.remote() for a in actors], timeout=60) == want
        # eu-1 is full: a second run that needs it gets none of what it asks for (us-2 stays free), and its
        # wait is bounded and says why
        said: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(PlacementError, match=r"second run: the CPUs it declares .* not free within 3 s"):
            reserve([("us-2", 1), ("eu-1", 1)], what="second run", timeout_s=3, progress=said.append)
        assert time.monotonic() - t0 < 20
        assert said and all("waiting for" in m for m in said)
        reserve([("us-2", 1)], what="third run", timeout_s=10).close()
    finally:
        held.close()
    reserve([("eu-1", 2)], what="after the first", timeout_s=30).close()  # closing gave eu-1 back
    assert [p for p in ray.util.placement_group_table().values() if p["state"] != "REMOVED"] == []


def _env_from_cli(name: str) -> dict[str, str]:
    out = run_cli("env", "--name", name)
    assert out.returncode == 0, out.stderr
    env = {}
    for line in out.stdout.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = shlex.split(value)[0]
    return env


@pytest.mark.timeout(180)
def test_ray_job_submit_reaches_the_cluster_through_edgeray_env(tiny):
    topo, _ = tiny
    env = _env_from_cli(NAME)
    assert env["RAY_AUTH_MODE"] == "token"
    out = run_bin(
        "ray",
        "job",
        "submit",
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "jobs/place_regions.py",
        "--topology",
        str(topo.path),
        env=env,
        timeout=170,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    for region in topo.regions:
        assert region in out.stdout
    # a job's environment is this cluster's, whatever the shell that started it carried
    keys = ("EDGERAY_WAN", "EDGERAY_TOPOLOGY", "EDGERAY_SERVE_PORT", "EDGERAY_CLUSTER")
    probe = f"import os; print('ENV', [os.environ.get(k) for k in {keys!r}])"
    out = run_bin("ray", "job", "submit", "--", "python", "-c", probe, env=env, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    want = [None, str(Path(topo.path).resolve()), env["EDGERAY_SERVE_PORT"], NAME]
    assert f"ENV {want}" in out.stdout, out.stdout[-2000:]


@pytest.mark.timeout(60)
def test_a_client_without_the_token_is_refused_in_bounded_time(tiny, tmp_path):
    _, state = tiny
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    env = {**state.env(), "RAY_AUTH_TOKEN_PATH": str(wrong)}
    with pytest.raises(cluster.ClusterError):
        cluster.probe_nodes(state.address, env, timeout_s=15)


@pytest.mark.timeout(60)
def test_attach_names_missing_labels(tiny):
    topo, state = tiny
    bigger = loads_topology(
        TINY.replace("accelerator: npu}]", "accelerator: npu}, {name: us-3}]").replace(
            "tier: regional", "tier: cloud"
        ),
        path="bigger.yaml",
    )
    with pytest.raises(cluster.ClusterError) as info:
        cluster.attach(bigger, state.address, name="t-attach-bad", token_path=state.token_path, auth="token")
    message = str(info.value)
    assert "us-3: edgeray.io/node=us-3" in message
    assert "eu-1: edgeray.io/tier=cloud" in message
    assert "t-attach-bad" not in cluster.list_clusters()

    attached = cluster.attach(topo, state.address, name="t-attach", token_path=state.token_path, auth="token")
    assert attached.attached and "t-attach" in cluster.list_clusters()
    assert cluster.down("t-attach") == []  # forgetting an attached cluster stops nothing
    assert cluster.probe_nodes(state.address, state.env())


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.timeout(240)
def test_cli_up_down_stops_exactly_its_own_processes(tiny, tmp_path):
    _, tiny_state = tiny
    tiny_pids = [p for pids in tiny_state.pids.values() for p in pids]
    solo = tmp_path / "solo.yaml"
    solo.write_text("name: solo\nregions:\n  - {name: x, tier: micro, nodes: [{name: x-1}]}\n")

    out = run_cli("up", str(solo), "--name", "t-solo")
    assert out.returncode == 0, out.stderr
    assert "GCS address" in out.stdout and "edgeray env --name t-solo" in out.stdout
    refused = run_cli("up", str(solo), "--name", "t-solo")
    assert refused.returncode == 2 and "already up" in refused.stderr and "Traceback" not in refused.stderr

    state = json.loads(
        (Path(os.environ["EDGERAY_HOME"]) / "clusters" / "t-solo" / "cluster.json").read_text()
    )
    solo_pids = [p for pids in state["pids"].values() for p in pids]
    assert solo_pids and not set(solo_pids) & set(tiny_pids)

    out = run_cli("down", "--name", "t-solo")
    assert out.returncode == 0 and "stopped" in out.stdout, out.stderr
    assert _alive(solo_pids) == []
    assert not [p for sid in state["sessions"].values() for p in cluster.session_processes(sid)]
    assert not Path(state["temp_dir"]).exists()
    assert sorted(_alive(tiny_pids)) == sorted(tiny_pids)  # the other cluster is untouched
    assert cluster.probe_nodes(tiny_state.address, tiny_state.env())

    again = run_cli("down", "--name", "t-solo")
    assert again.returncode == 0 and "nothing running" in again.stdout


@pytest.mark.timeout(240)
def test_serve_run_pins_one_replica_per_region_and_answers_over_http(tiny, tmp_path):
    import requests
    import yaml

    topo, state = tiny
    config = yaml.safe_load((ROOT / "serve_apps" / "regions.yaml").read_text())
    config["http_options"]["port"] = state.serve_port
    config["applications"][0]["args"]["topology"] = str(topo.path)
    cfg = tmp_path / "regions.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = _env_from_cli(NAME)
    out = run_bin("serve", "run", str(cfg), "--non-blocking", env=env, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    base = f"http://{cluster.LOOPBACK_IP}:{state.serve_port}/"
    try:
        deadline = time.monotonic() + 150
        while True:  # the app deploys asynchronously; bounded wait for the first 200
            try:
                reply = requests.get(base, params={"region": "us", "text": "hi"}, timeout=10)
                if reply.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the Serve app did not come up within 150 s"
            time.sleep(1)
        for region in topo.regions.values():
            body = requests.get(base, params={"region": region.name, "text": "hi"}, timeout=10).json()
            assert body["region"] == region.name and body["echo"] == "hi"
            assert body["labels"]["edgeray.io/region"] == region.name
            assert body["labels"]["edgeray.io/node"] in {n.name for n in region.nodes}
        assert requests.get(base, params={"near": "eu-1"}, timeout=10).json()["region"] == "eu"
        bad = requests.get(base, params={"region": "mars"}, timeout=10)
        assert bad.status_code == 400 and "regions are ['eu', 'us']" in bad.json()["error"]
    finally:
        run_bin("serve", "shutdown", "-y", env=env, timeout=120)

"""Packet-level WAN emulation (edgeray.wan): the router's plan against the topology, namespace plumbing and
cleanup, round-trip time / rate / loss measured by real sockets against the link spec, a Ray round trip
across regions on an `edgeray up --wan` cluster, and the refusal without privileges.

The cluster suite on a `--wan` cluster is `EDGERAY_TEST_WAN=1 python -m pytest -m "not unit"`
(tests/conftest.py)."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgeray.fabric.links import LinkModel
from edgeray.topology import Topology, load_topology, resolve_topology_path
from edgeray.wan import netns

from .conftest import run_bin

CAN_NETNS = os.geteuid() == 0 and os.path.exists("/dev/net/tun") and shutil.which("ip") is not None
needs_netns = pytest.mark.skipif(
    not CAN_NETNS, reason="needs root, /dev/net/tun and iproute2 (edgeray up --wan refuses without them)"
)

# Two regions with round figures, so the expected times are easy to read: a site LAN (5 ms one way), a
# 20 ms / 40 Mbit/s backhaul, and a lossy third region behind it.
TEST_TOPOLOGY = {
    "name": "wan-test",
    "regions": [
        {"name": "site", "tier": "micro", "nodes": [{"name": "s1"}, {"name": "s2"}],
         "intra_link": {"latency_ms": 5, "jitter_ms": 0, "bandwidth_mbps": 200, "loss": 0}},
        {"name": "dc", "tier": "cloud", "nodes": [{"name": "d1"}]},
        {"name": "far", "tier": "device", "nodes": [{"name": "f1"}]},
    ],
    "links": [
        {"between": ["site", "dc"], "latency_ms": 20, "jitter_ms": 0, "bandwidth_mbps": 40, "loss": 0},
        {"between": ["dc", "far"], "latency_ms": 2, "jitter_ms": 0, "bandwidth_mbps": 100, "loss": 0.05},
    ],
}  # fmt: skip


def _topology() -> Topology:
    return Topology.from_dict(json.loads(json.dumps(TEST_TOPOLOGY)))


# --------------------------------------------------------------------------------------------- the plan
def test_every_path_follows_the_topologys_route_and_the_fabrics_resources():
    topo = load_topology(resolve_topology_path("local"))
    plan = netns.wan_plan(topo, cluster_key="plan-test", subnet=7)
    names = [e["name"] for e in plan["endpoints"]]
    assert names == ["head", *topo.nodes]
    assert [e["address"] for e in plan["endpoints"]] == [f"198.18.7.{i}" for i in range(1, len(names) + 1)]
    assert plan["endpoints"][0]["ns"] is None  # the head is in the root namespace, beside the drivers
    assert len({e["ns"] for e in plan["endpoints"][1:]}) == len(topo.nodes)
    assert plan["head_region"] == "cloud"
    model = LinkModel(topo)
    assert len(plan["paths"]) == len(names) * (len(names) - 1)
    for p in plan["paths"]:
        a, b = names[p["src"]], names[p["dst"]]
        link = topo.link(a if a != "head" else "cloud", b if b != "head" else "cloud")
        assert (p["latency_ms"], p["jitter_ms"], p["loss"], p["bandwidth_mbps"]) == (
            link.latency_ms, link.jitter_ms, link.loss, link.bandwidth_mbps,
        )  # fmt: skip
        if "head" not in (a, b):  # node to node: exactly the resources the fabric's model shares
            expected = ["/".join(k) for k, _ in model.resources(a, b)]
            assert p["resources"] == expected
            for key, mbps in model.resources(a, b):
                assert plan["resources"]["/".join(key)]["mbps"] == mbps
    for key, r in plan["resources"].items():  # queues hold at least one bandwidth-delay product
        assert r["queue_bytes"] >= netns.MIN_QUEUE, key


def test_a_head_region_that_does_not_exist_names_the_valid_ones():
    from edgeray.topology import TopologyError

    with pytest.raises(TopologyError, match="campus"):
        netns.wan_plan(load_topology(resolve_topology_path("local")), cluster_key="x", subnet=1,
                       head_region="mars")  # fmt: skip


# --------------------------------------------------------------------------------------------- plumbing
@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """The test topology's namespaces and router (no Ray): what `edgeray up --wan` builds first."""
    if not CAN_NETNS:
        pytest.skip("needs root, /dev/net/tun and iproute2")
    key = f"pytest-wan-{os.getpid()}"
    plan = netns.wan_plan(_topology(), cluster_key=key, subnet=netns.pick_subnet(key), head_region="dc")
    state = netns.setup(plan, tmp_path_factory.mktemp("wan"))
    yield state
    netns.teardown(state)


def _py(state: netns.WanState, endpoint: str, code: str, timeout: float = 60) -> str:
    """Run Python ``code`` inside ``endpoint``'s namespace (the head: the root namespace); its stdout."""
    argv = [sys.executable, "-c", textwrap.dedent(code)]
    cmd = argv if endpoint == "head" else netns.run_in(state, endpoint, argv)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _server(state: netns.WanState, endpoint: str, code: str) -> subprocess.Popen:
    argv = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.Popen(
        argv if endpoint == "head" else netns.run_in(state, endpoint, argv), stdout=subprocess.PIPE, text=True
    )


@needs_netns
def test_each_namespace_has_only_its_tun_and_the_clusters_route(wan):
    subnet = f"198.18.{wan.subnet}.0/24"
    for node, ns in wan.namespaces.items():
        links = json.loads(subprocess.check_output(["ip", "-j", "-n", ns, "link"], text=True))
        tun = next(
            e
            for e in netns.wan_plan(
                _topology(), cluster_key=wan.cluster, subnet=wan.subnet, head_region="dc"
            )["endpoints"]
            if e["name"] == node
        )["tun"]
        assert sorted(link["ifname"] for link in links) == sorted(["lo", tun])
        routes = subprocess.check_output(["ip", "-n", ns, "-4", "route"], text=True).split("\n")
        routes = [r for r in routes if r.strip()]
        assert len(routes) == 1 and routes[0].startswith(subnet), routes  # no default route: no way out
        addrs = subprocess.check_output(["ip", "-n", ns, "-4", "-br", "addr"], text=True)
        assert f"{wan.addresses[node]}/24" in addrs
    # the root namespace reaches the cluster only through the head's TUN
    assert subnet in subprocess.check_output(["ip", "-4", "route", "show", "dev", wan.head_tun], text=True)
    # an address outside the cluster is unreachable from a node
    out = _py(wan, "s1", """
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"x", ("8.8.8.8", 53)); print("sent")
        except OSError as exc:
            print("unreachable", exc.errno)
    """)  # fmt: skip
    assert out.startswith("unreachable"), out


ECHO = """
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("{addr}", 9999)); print("ready", flush=True)
    while True:
        d, a = s.recvfrom(65535); s.sendto(d, a)
"""
PING = """
    import socket, time, json
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    out = []
    for _ in range({n}):
        t = time.perf_counter(); s.sendto(b"x" * 64, ("{addr}", 9999))
        try:
            s.recvfrom(100); out.append((time.perf_counter() - t) * 1e3)
        except socket.timeout:
            pass
        time.sleep(0.005)
    print(json.dumps(out))
"""


def _rtt_ms(state: netns.WanState, src: str, dst: str, n: int = 40) -> list[float]:
    server = _server(state, dst, ECHO.format(addr=state.addresses[dst]))
    try:
        assert server.stdout is not None and server.stdout.readline().startswith("ready")
        return json.loads(_py(state, src, PING.format(n=n, addr=state.addresses[dst])))
    finally:
        server.kill()
        server.wait()


@needs_netns
@pytest.mark.parametrize(
    "src,dst", [("s1", "s2"), ("s1", "d1"), ("head", "s1")], ids=["intra-region", "inter-region", "head"]
)
def test_round_trip_is_twice_the_one_way_spec(wan, src, dst):
    topo = _topology()
    one_way = topo.link(src if src != "head" else "dc", dst).latency_ms
    rtts = _rtt_ms(wan, src, dst)
    assert len(rtts) >= 38  # lossless links
    # within 10% of 2x the spec, plus 2 ms for two Python endpoints and the router on a busy machine (a link
    # charged twice would be 2x off; bench_wan.py reports the exact figures). These links have no jitter, so
    # every sample is the link plus delays the machine adds, never less: the lower quartile is the link's
    # figure (like ping's minimum). The median moved 3-4 ms in bursts of host CPU steal here.
    low = statistics.quantiles(rtts, n=4)[0]
    assert low == pytest.approx(2 * one_way, rel=0.10, abs=2.0), sorted(rtts)
    # never earlier than the link allows (less what the router wakes ahead by: its mean wake-up delay)
    assert min(rtts) >= 2 * one_way - 0.2


@needs_netns
def test_tcp_goodput_is_the_links_rate(wan):
    """40 Mbit/s backhaul, 40 ms round trip: a bulk TCP transfer's goodput after slow start is the rate.
    Judged by the median of its megabytes past the first two: one loss recovery, or the receiver descheduled
    on a busy machine, stalls a megabyte or two (measured: one in 8 MB at 29 Mbit/s, the rest 37-38), and a
    rate the router did not enforce, or enforced wrongly, moves every megabyte."""
    server = _server(wan, "d1", f"""
        import socket, time, json
        s = socket.create_server(("{wan.addresses["d1"]}", 9998)); print("ready", flush=True)
        c, _ = s.accept(); n = 0; marks = []
        while (d := c.recv(1 << 16)):
            n += len(d)
            while n >= (len(marks) + 1) << 20:
                marks.append(time.perf_counter())
        print(json.dumps({{"n": n, "marks": marks}}), flush=True)
    """)  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().startswith("ready")
        _py(wan, "s1", f"""
            import socket
            c = socket.create_connection(("{wan.addresses["d1"]}", 9998), timeout=60)
            c.sendall(b"x" * (10 << 20)); c.close()
        """)  # fmt: skip
        result = json.loads(server.stdout.readline())
    finally:
        server.kill()
        server.wait()
    assert result["n"] == 10 << 20  # nothing lost end to end: TCP recovered every dropped packet
    marks = result["marks"][2:]  # past slow start
    per_mb = [8 * (1 << 20) / (b - a) / 1e6 for a, b in itertools.pairwise(marks)]
    assert statistics.median(per_mb) == pytest.approx(40, rel=0.10), (
        per_mb
    )  # TCP fills the queue, pacing sets it


@needs_netns
def test_loss_rate_is_the_links(wan):
    """5% loss on the far link: of 3000 one-way datagrams, the share lost is 5% within 4 standard errors."""
    n, p = 3000, 0.05
    server = _server(wan, "f1", f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("{wan.addresses["f1"]}", 9997))
        # room for every datagram (root may exceed rmem_max): a receiver descheduled on a busy machine must
        # not drop any at its socket, or the test would count them as the link's loss
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
        s.settimeout(3); print("ready", flush=True); got = 0
        try:
            while True:
                s.recvfrom(100); got += 1
        except socket.timeout:
            print(got, flush=True)
    """)  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().startswith("ready")
        _py(wan, "d1", f"""
            import socket, time
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for i in range({n}):
                s.sendto(b"y" * 64, ("{wan.addresses["f1"]}", 9997))
                if i % 50 == 0: time.sleep(0.002)
        """)  # fmt: skip
        got = int(server.stdout.readline())
    finally:
        server.kill()
        server.wait()
    lost = 1 - got / n
    assert abs(lost - p) < 4 * math.sqrt(p * (1 - p) / n), lost
    stats = netns.router_stats(wan)
    assert stats["priority"]  # the router says what scheduling class it got


@needs_netns
def test_teardown_leaves_no_namespace_tun_or_router(tmp_path):
    key = f"pytest-wan-teardown-{os.getpid()}"
    plan = netns.wan_plan(_topology(), cluster_key=key, subnet=netns.pick_subnet(key))
    state = netns.setup(plan, tmp_path)
    prefix = netns.namespace_prefix(key)
    assert sum(ns.startswith(prefix) for ns in netns.list_namespaces()) == 4
    # a stray process inside a namespace does not keep it alive
    stray = subprocess.Popen(netns.run_in(state, "s1", ["sleep", "300"]))
    netns.teardown(state)
    assert stray.wait(timeout=10) != 0
    assert not [ns for ns in netns.list_namespaces() if ns.startswith(prefix)]
    tuns = [e["tun"] for e in plan["endpoints"]]
    links = subprocess.check_output(["ip", "-br", "link"], text=True)
    assert not [t for t in tuns if t in links]
    assert not netns._alive(state.router_pid)
    assert netns.teardown(state) == []  # idempotent


@needs_netns
def test_stale_namespaces_of_a_dead_cluster_are_removed_at_start(tmp_path):
    key = f"pytest-wan-stale-{os.getpid()}"
    prefix = netns.namespace_prefix(key)
    subprocess.run(["ip", "netns", "add", f"{prefix}9"], check=True)
    plan = netns.wan_plan(_topology(), cluster_key=key, subnet=netns.pick_subnet(key))
    state = netns.setup(plan, tmp_path)
    try:
        assert f"{prefix}9" not in netns.list_namespaces()
    finally:
        netns.teardown(state)


# --------------------------------------------------------------------------------------------- privileges
def _as_nobody(fn) -> tuple[int, str]:
    """Run ``fn`` in a forked child that dropped root (uid/gid 65534); its exit code and what it wrote."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.dup2(w, 1)
            os.dup2(w, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - not pytest's capture
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            fn()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            os.write(w, f"{type(exc).__name__}: {exc}".encode())
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_without_root_up_wan_refuses_and_says_what_is_missing(tmp_path):
    code, text = _as_nobody(netns.check_privileges)
    assert code == 3 and "WanError" in text and "root" in text, text
    from edgeray.cli import main

    os.chmod(tmp_path, 0o777)

    def cli() -> None:
        os.environ["EDGERAY_HOME"] = str(tmp_path)
        main(["up", "local", "--wan"], standalone_mode=True)

    code, text = _as_nobody(cli)
    assert code != 0
    assert "--wan" in text and "root" in text and "Traceback" not in text, text
    assert not (Path(tmp_path) / "clusters").exists() or not list(Path(tmp_path, "clusters").iterdir())


# --------------------------------------------------------------------------------------------- on Ray
@pytest.fixture(scope="module")
def ray_wan(edgeray_home, tmp_path_factory):
    """`edgeray up --wan` of the test topology, shared by this module's Ray tests; after them, nothing of it
    is left."""
    from edgeray import cluster

    path = tmp_path_factory.mktemp("wan-ray") / "wan-test.yaml"
    path.write_text(json.dumps(TEST_TOPOLOGY))
    state = cluster.up(load_topology(path), name="t-wan", wan=True)
    try:
        yield state, path
    finally:
        cluster.down("t-wan")
    assert not [ns for ns in netns.list_namespaces() if ns.startswith(netns.namespace_prefix(
        str(cluster.state_dir("t-wan").resolve())))]  # fmt: skip


@needs_netns
@pytest.mark.cluster
@pytest.mark.slow
def test_ray_calls_across_regions_pay_the_route(ray_wan):
    """A driver on this host times actor calls from s1 to s2 (same site, 5 ms one way) and to d1 (20 ms):
    each call is at least one round trip of its route."""
    state, path = ray_wan
    assert state.address.startswith(f"198.18.{state.wan['subnet']}.1:")
    driver = textwrap.dedent("""
        import json, statistics, time, ray
        ray.init(log_to_driver=False)
        @ray.remote(num_cpus=0)
        class P:
            def ping(self): return ray.util.get_node_ip_address()
            def time_calls(self, other, n=15):
                ray.get(other.ping.remote())
                out = []
                for _ in range(n):
                    t = time.perf_counter(); ray.get(other.ping.remote()); out.append(time.perf_counter() - t)
                return statistics.median(out) * 1e3
        on = lambda n: P.options(label_selector={"edgeray.io/node": n}).remote()
        s1, s2, d1 = on("s1"), on("s2"), on("d1")
        ips = ray.get([a.ping.remote() for a in (s1, s2, d1)], timeout=120)
        site, dc = ray.get(s1.time_calls.remote(s2), timeout=120), ray.get(s1.time_calls.remote(d1), timeout=120)
        # the fabric on a --wan cluster: no in-process delay of its own, bytes still in the ledger
        import numpy as np
        from edgeray.fabric.collectives import GroupPlan
        from edgeray.fabric.groups import RunGroups
        from edgeray.fabric.worker import FabricWorker
        from edgeray.topology import load_topology
        topo = load_topology(TOPOLOGY)
        with RunGroups("wan-test") as groups:
            plan = GroupPlan.from_nodes(topo, ["s1", "d1"], prefix=groups.name("g/"))
            ws = [FabricWorker.options(label_selector={"edgeray.io/node": n}).remote(TOPOLOGY, n, time_scale=1.0)
                  for n in plan.nodes]
            ray.get([w.join.remote(plan) for w in ws], timeout=120)
            ray.get([w.run.remote("flat", np.ones(16384, np.float32)) for w in ws], timeout=120)
            packet_level = ray.get([w.__ray_call__.remote(lambda self: self.fabric.packet_level) for w in ws])
            rows = sum(ray.get([w.ledger_rows.remote() for w in ws]), [])
            for w in ws:
                ray.kill(w)
        print(json.dumps({"ips": ips, "site": site, "dc": dc, "packet_level": packet_level,
                          "bytes": sum(r["bytes"] for r in rows)}))
    """).replace("TOPOLOGY", repr(str(path)))  # fmt: skip
    env = {**os.environ, **state.env()}
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env,
                         timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ips"] == [state.wan["addresses"][n] for n in ("s1", "s2", "d1")]
    # each call is at least one round trip of its route, plus Ray's own work (loose upper bound: a busy
    # machine slows Ray, not the links)
    assert got["site"] >= 10 and got["dc"] >= 40, got
    assert got["dc"] - got["site"] >= 25 and got["dc"] < 150, got  # the routes differ by 30 ms
    assert got["packet_level"] == [True, True]
    assert got["bytes"] == 2 * 2 * (16384 // 2) * 4  # a 2-node ring: two steps, half the tensor each
    stats = netns.router_stats(netns.WanState(**state.wan))
    assert any(p["src"] == "s1" and p["dst"] == "d1" for p in stats["paths"])
    shown = run_bin("edgeray", "status", "--name", "t-wan")
    assert shown.returncode == 0 and "network: packet-level router" in shown.stdout, shown.stderr
    # a client in s1's namespace reaches the dashboard (beside the head, in dc) through s1's route
    timed = run_bin("edgeray", "exec", "--name", "t-wan", "--node", "s1", "--", sys.executable, "-c",
                    "import http.client as h, os, time; t = time.perf_counter(); "
                    "c = h.HTTPConnection(os.environ['RAY_DASHBOARD_ADDRESS'][7:], timeout=30); "
                    "c.request('GET', '/api/version'); c.getresponse().read(); "  # 200, or 401 without the token
                    "print(time.perf_counter() - t)")  # fmt: skip
    assert timed.returncode == 0, timed.stderr
    assert float(timed.stdout.strip()) >= 2 * 0.040  # TCP handshake + request: two 40 ms round trips
    refused = run_bin("edgeray", "exec", "--name", "t-wan", "--node", "mars", "--", "true")
    assert refused.returncode != 0 and "s1" in refused.stderr + refused.stdout


STREAM_ONE = """
import json, sys, time, requests
t = time.perf_counter(); ttft = None; meta = {}
headers = json.loads(sys.argv[2])
body = {"model": "edgeray-tiny", "prompt": "The forest", "max_tokens": 3, "stream": True, "temperature": 0}
with requests.post(sys.argv[1] + "/v1/completions", json=body, headers=headers, stream=True, timeout=120) as r:
    if r.status_code != 200:
        print(json.dumps({"status": r.status_code, "error": r.json()["error"]})); sys.exit()
    for line in r.iter_lines():
        if ttft is None and line.startswith(b"data: "):
            ttft = (time.perf_counter() - t) * 1e3
        if line.startswith(b": edgeray "):
            meta = json.loads(line[10:])
print(json.dumps({"status": 200, "client_ttft_ms": ttft, **meta}))
"""


@needs_netns
@pytest.mark.cluster
@pytest.mark.slow
def test_each_regions_callers_enter_through_its_ingress_and_pay_the_real_network(ray_wan):
    """The regional app on the `--wan` cluster: an ingress per region. A client in s2's namespace asks the
    site's ingress: its caller region is the site, and the breakdown's network part is measured: the kernel's
    round trips of its connection (s2 to the ingress's node: 10 ms, or ~0 on the same node) and of the path to
    the replica, which match the topology. With the site's engine stopped the request spills to the next
    region routing tries, and the path's round trip is that region's. A header naming another region is
    refused (400)."""
    import signal

    import psutil
    import requests

    from edgeray.serve.routing import Router

    state, path = ray_wan
    env = state.env()
    port = state.serve_port
    out = run_bin("serve", "run", "edgeray.serve:app", "engine=torch", "auth=open", f"port={port}",
                  "max_model_len=64", "--non-blocking", env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    head = f"http://{state.wan['addresses']['head']}:{port}"
    try:

        def status(base: str) -> dict:
            return requests.get(f"{base}/edgeray/status", timeout=10).json()

        def wait(base: str, healthy: bool, regions=("site", "dc"), timeout_s: float = 240) -> dict:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                with contextlib.suppress(requests.RequestException, ValueError):
                    got = status(base)
                    reps = [r for r in got["replicas"] if r["region"] in regions]
                    if {r["region"] for r in reps} == set(regions) and all(
                        r["healthy"] is healthy and (r["rtt_ms"] is not None or not healthy) for r in reps
                    ):
                        return got
                time.sleep(0.5)
            raise AssertionError(f"{base}: replicas of {regions} not healthy={healthy} in {timeout_s} s")

        def ask(node: str, base: str, headers: dict | None = None) -> dict:
            ran = run_bin("edgeray", "exec", "--name", "t-wan", "--node", node, "--", sys.executable, "-c",
                          STREAM_ONE, base, json.dumps(headers or {}), timeout=180)  # fmt: skip
            assert ran.returncode == 0, ran.stderr[-2000:]
            return json.loads(ran.stdout.strip().splitlines()[-1])

        shown = wait(head, True)
        assert shown["network"] == "measured" and set(shown["ingresses"]) == {"site", "dc", "far"}, shown
        site = shown["ingresses"]["site"]
        ingress = wait(site, True)
        assert ingress["ingress_region"] == "site" and ingress["node"] in ("s1", "s2"), ingress
        client = "s2" if ingress["node"] == "s1" else "s1"
        replica = next(r for r in ingress["replicas"] if r["region"] == "site")
        ask(client, site)  # warms the path
        got = ask(client, site)
        assert got["status"] == 200 and got["region"] == "site" and got["caller_region"] == "site", got
        assert got["network_clock"] == "measured" and not got["spilled"], got
        # s2 <-> the ingress's node: the site LAN's 2 x 5 ms (jitter 0); the path to the replica likewise,
        # or ~0 when the replica shares the ingress's node
        assert 9.5 <= got["caller_rtt_ms"] <= 14, got
        lan = 10.0 if replica["node"] != ingress["node"] else 0.0
        assert lan - 0.5 <= got["path_rtt_ms"] <= lan + 4, (got, replica)
        assert got["network_in_ms"] == pytest.approx(
            (got["caller_rtt_ms"] + got["path_rtt_ms"]) / 2, abs=0.01
        )
        assert got["client_ttft_ms"] >= got["caller_rtt_ms"] + got["path_rtt_ms"], got  # paid for real

        wrong = ask(client, site, {"x-edgeray-region": "dc"})
        assert wrong["status"] == 400 and wrong["error"]["code"] == "wrong_ingress", wrong
        assert "dc" in wrong["error"]["message"] and "site" in wrong["error"]["message"], wrong

        # the site's engine stopped (a hung region): the ingress sees it unhealthy and spills to dc, whose
        # path from the site is the backhaul's 2 x 20 ms
        stopped = [psutil.Process(replica["pid"]), *psutil.Process(replica["pid"]).children(recursive=True)]
        for p in stopped:
            p.send_signal(signal.SIGSTOP)
        try:
            wait(site, False, regions=("site",), timeout_s=30)
            spilled = ask(client, site)
        finally:
            for p in stopped:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGCONT)
        # the next region routing tries (edgeray.serve.routing: the nearest, cloud tiers last): far, behind
        # dc, 2 x (20 + 2) ms away
        nxt = Router(load_topology(path)).candidates("site")[1]
        assert (
            nxt == "far" and spilled["status"] == 200 and spilled["region"] == nxt and spilled["spilled"]
        ), spilled
        assert 43.5 <= spilled["path_rtt_ms"] <= 50, spilled
        assert spilled["client_ttft_ms"] >= spilled["caller_rtt_ms"] + 44, spilled
    finally:
        run_bin("serve", "shutdown", "-y", env=env, timeout=120)

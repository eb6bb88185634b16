"""Network namespaces for a ``--wan`` cluster: one per raylet, joined only through the WAN router.

    plan = wan_plan(topology, cluster="local", subnet=7)   # endpoints, paths, resources
    wan = setup(plan, state_dir)                           # namespaces, router, TUNs, addresses
    run_in(wan, "cloud-1", ["python", "-m", ...])          # a command inside one namespace
    teardown(wan)                                          # router stopped, namespaces deleted

Addresses come from 198.18.0.0/15 (reserved for benchmarking, RFC 2544): cluster ``subnet`` s gets
198.18.s.0/24; the head is .1, the topology's nodes .2, .3, ... in topology order. Each node's namespace has
``lo`` and its TUN, whose only route is the cluster's /24: there is no route out of a node's namespace.

The head (GCS, dashboard, job API, Serve's controller) runs in the root namespace, on a TUN of its own whose
only route is the cluster's /24, and listens only on its cluster address. That is the choice the issue
left open ("drivers run inside the head's namespace"): every driver on this host - a shell's `ray.init()`,
`serve run`, `ray job submit`, a notebook - is in the head's namespace without being told, and Ray
attaches it to the head's raylet as on any head node, so everything users type works unchanged. The head
is placed in ``head_region`` (default: the first cloud-tier region): traffic between it (or a driver) and a
node pays that node's route to the head's region.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeray.errors import EdgerayError
from edgeray.fabric.links import port_mbps
from edgeray.topology import Tier, Topology

NETWORK = "198.18"
DEFAULT_MTU = 9000
NS_PREFIX = "erw-"
ROUTER_START_S = 15.0


class WanError(EdgerayError):
    """A ``--wan`` cluster cannot be set up here, or its network failed; the message says what to do."""


@dataclass
class WanState:
    """What ``setup`` created (saved in the cluster's state, read by ``teardown``)."""

    cluster: str
    subnet: int
    namespaces: dict[str, str]
    """Topology node -> its namespace's name (the head stays in the root namespace)."""
    addresses: dict[str, str]
    """Endpoint (``head`` or a node name) -> IPv4 address."""
    head_tun: str
    router_pid: int = 0
    router_dir: str = ""
    mtu: int = DEFAULT_MTU
    head_region: str = ""
    priority: str = ""

    @property
    def head_address(self) -> str:
        return self.addresses["head"]


# ----------------------------------------------------------------------------------------------- checks
def check_privileges() -> None:
    """Refuse clearly where namespaces cannot be made: not root, no /dev/net/tun, no iproute2."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces and TUN devices need CAP_NET_ADMIN): run as root")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun (the TUN driver): load it with `modprobe tun`")
    elif os.geteuid() == 0 and not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        missing.append("read/write access to /dev/net/tun")
    if shutil.which("ip") is None:
        missing.append("the `ip` command: apt-get install iproute2")
    if missing:
        raise WanError(
            "edgeray up --wan cannot emulate the network on this machine; missing: " + "; ".join(missing)
            + ". Without --wan, links are modelled in-process by the fabric."
        )  # fmt: skip


def _ip(*args: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise WanError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def list_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_prefix(cluster: str) -> str:
    """Namespaces of cluster ``cluster`` are named ``erw-<8 hex of the cluster's state dir>-<i>``."""
    return f"{NS_PREFIX}{hashlib.sha1(cluster.encode()).hexdigest()[:8]}-"


def remove_stale(cluster_key: str) -> list[str]:
    """Delete namespaces left by an earlier run of this cluster (a crash skipped its ``down``); returns them.
    Only this cluster's prefix is touched."""
    prefix = namespace_prefix(cluster_key)
    gone = []
    for ns in list_namespaces():
        if ns.startswith(prefix):
            _kill_namespace_processes(ns)
            _ip("netns", "del", ns, check=False)
            gone.append(ns)
    return gone


def _kill_namespace_processes(ns: str) -> None:
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)


def _used_subnets() -> set[int]:
    out = _ip("-4", "route", "show", check=False).stdout
    used = set()
    for line in out.splitlines():
        head = line.split()[0] if line.split() else ""
        if head.startswith(NETWORK + "."):
            with contextlib.suppress(ValueError, IndexError):
                used.add(int(head.split(".")[2]))
    return used


def pick_subnet(cluster_key: str) -> int:
    """A /24 of 198.18.0.0/24..198.18.255.0/24 no other route on the host uses (stable per cluster)."""
    start = int(hashlib.sha1(cluster_key.encode()).hexdigest()[:4], 16) % 256
    used = _used_subnets()
    for i in range(256):
        s = (start + i) % 256
        if s not in used:
            return s
    raise WanError(
        "every /24 of 198.18.0.0/16 is routed on this host already: run `edgeray down` on a --wan cluster"
    )


# ----------------------------------------------------------------------------------------------- the plan
def default_head_region(topology: Topology) -> str:
    for region in topology.regions.values():
        if region.tier is Tier.CLOUD:
            return region.name
    return next(iter(topology.regions))


def wan_plan(
    topology: Topology,
    *,
    cluster_key: str,
    subnet: int,
    head_region: str | None = None,
    mtu: int = DEFAULT_MTU,
    seed: int = 0,
) -> dict[str, Any]:
    """Endpoints, shared resources and the path of every ordered endpoint pair (what the router reads).

    A path's latency, jitter and loss are the topology's route between the two endpoints (the head as a
    member of ``head_region``); its resources are those :class:`edgeray.fabric.links.LinkModel` charges,
    so contention in the router and in the fabric's model agree."""
    head_region = head_region or default_head_region(topology)
    topology.region(head_region)  # raises with the valid names
    prefix = namespace_prefix(cluster_key)
    digest = prefix[len(NS_PREFIX) : -1]
    nodes = [n.name for n in topology.iter_nodes()]
    endpoints: list[dict[str, Any]] = [
        {"name": "head", "ns": None, "address": f"{NETWORK}.{subnet}.1", "tun": f"erw{digest}h"},
    ]
    for i, node in enumerate(nodes, 1):
        endpoints.append(
            {"name": node, "ns": f"{prefix}{i}", "address": f"{NETWORK}.{subnet}.{i + 1}", "tun": f"erw{digest}{i}"}
        )  # fmt: skip
    resources: dict[str, dict[str, Any]] = {}

    def resource(key: str, mbps: float, rtt_s: float) -> str:
        queue = max(MIN_QUEUE, int(mbps * 1e6 / 8 * max(rtt_s, 1e-3)))
        if key not in resources:
            resources[key] = {"mbps": mbps, "queue_bytes": queue}
        else:
            resources[key]["queue_bytes"] = max(resources[key]["queue_bytes"], queue)
        return key

    def where(name: str) -> tuple[str, str | None]:
        if name == "head":
            return head_region, None
        return topology.nodes[name].region, name

    paths = []
    for i, a in enumerate(endpoints):
        for j, b in enumerate(endpoints):
            if i == j:
                continue
            (ra, na), (rb, nb) = where(a["name"]), where(b["name"])
            route = topology.route(na or ra, nb or rb)
            link = route.link
            rtt = 2 * link.latency_ms / 1e3
            keys = [resource(f"out/{a['name']}", _port(topology, na, ra), rtt)]
            for x, y in zip(route.regions, route.regions[1:], strict=False):
                bw = topology.inter_links[frozenset((x, y))].bandwidth_mbps
                keys.append(resource(f"wan/{x}/{y}", bw, rtt))
            keys.append(resource(f"in/{b['name']}", _port(topology, nb, rb), rtt))
            paths.append(
                {
                    "src": i,
                    "dst": j,
                    "latency_ms": link.latency_ms,
                    "jitter_ms": link.jitter_ms,
                    "loss": link.loss,
                    "bandwidth_mbps": link.bandwidth_mbps,
                    "resources": keys,
                }
            )
    return {
        "cluster": cluster_key,
        "subnet": subnet,
        "mtu": mtu,
        "seed": seed,
        "head_region": head_region,
        "endpoints": endpoints,
        "resources": resources,
        "paths": paths,
    }


MIN_QUEUE = 64 << 10


def _port(topology: Topology, node: str | None, region: str) -> float:
    if node is not None:
        return port_mbps(topology, node)
    return topology.regions[region].intra_link.bandwidth_mbps


# ----------------------------------------------------------------------------------------------- set-up
def setup(plan: dict[str, Any], out_dir: Path, *, timeout_s: float = ROUTER_START_S) -> WanState:
    """Create the namespaces, start the router, move each TUN into its namespace and address it.
    On any failure everything created so far is removed and :class:`WanError` says what failed."""
    check_privileges()
    out_dir.mkdir(parents=True, exist_ok=True)
    key = plan["cluster"]
    remove_stale(key)
    endpoints = plan["endpoints"]
    state = WanState(
        cluster=key,
        subnet=plan["subnet"],
        namespaces={e["name"]: e["ns"] for e in endpoints if e["ns"]},
        addresses={e["name"]: e["address"] for e in endpoints},
        head_tun=next(e["tun"] for e in endpoints if e["ns"] is None),
        router_dir=str(out_dir),
        mtu=plan["mtu"],
        head_region=plan["head_region"],
    )
    try:
        for ns in state.namespaces.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        plan_path = out_dir / "plan.json"
        tmp = plan_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan))
        os.replace(tmp, plan_path)
        for f in ("ready", "stats.json"):
            (out_dir / f).unlink(missing_ok=True)
        log = open(out_dir / "router.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeray.wan.router", str(plan_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log.close()
        state.router_pid = proc.pid
        deadline = time.monotonic() + timeout_s
        while not (out_dir / "ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (out_dir / "router.log").read_text(errors="replace")[-1500:]
                raise WanError(f"the WAN router did not start (exit {proc.poll()}); its log:\n{tail}")
            time.sleep(0.05)
        state.priority = json.loads((out_dir / "ready").read_text()).get("priority", "")
        prefix = f"{NETWORK}.{state.subnet}.0/24"
        for e in endpoints:
            tun, addr = e["tun"], e["address"]
            if e["ns"] is None:
                _ip("addr", "add", f"{addr}/32", "dev", tun)  # the head's, in the root namespace
                _ip("link", "set", tun, "mtu", str(state.mtu), "up")
                _ip("route", "add", prefix, "dev", tun, "src", addr)
                continue
            ns = e["ns"]
            _ip("link", "set", tun, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", tun)
            _ip("-n", ns, "link", "set", tun, "mtu", str(state.mtu), "up")
        return state
    except BaseException:
        teardown(state)
        raise


def run_in(state: WanState, endpoint: str, argv: list[str]) -> list[str]:
    """``argv`` wrapped to run inside ``endpoint``'s namespace (``ip netns exec``)."""
    return ["ip", "netns", "exec", state.namespaces[endpoint], *argv]


def teardown(state: WanState) -> list[str]:
    """Stop the router (its TUN devices go with it) and delete this cluster's namespaces, killing what still
    runs in them; returns the namespaces deleted. Idempotent; touches nothing else."""
    if state.router_pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if _is_router(state.router_pid):
                os.kill(state.router_pid, signal.SIGTERM)
                for _ in range(50):
                    if not _alive(state.router_pid):
                        break
                    time.sleep(0.05)
                else:
                    os.kill(state.router_pid, signal.SIGKILL)
    gone = []
    existing = set(list_namespaces())
    for ns in state.namespaces.values():
        if ns in existing:
            _kill_namespace_processes(ns)
            _ip("netns", "del", ns, check=False)
            gone.append(ns)
    # The head's TUN belongs to the router and vanishes with it; remove it should a stuck router keep it.
    _ip("link", "del", state.head_tun, check=False)
    return gone


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _is_router(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"edgeray.wan.router" in cmdline


def router_stats(state: WanState) -> dict[str, Any]:
    """The router's latest ``stats.json`` (load, packets, drops per path), or {} before the first one."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((Path(state.router_dir) / "stats.json").read_text())
    return {}

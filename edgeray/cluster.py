"""A labelled Ray cluster from a topology: up / attach / status / env / down, by recorded PIDs.

    edgeray up clusters/local.yaml            # head + one raylet per topology node, on loopback
    eval "$(edgeray env --name local)"        # ray job submit / serve run now reach it
    edgeray status --name local
    edgeray down --name local

Each local cluster gets a private Ray temp dir, its own ports, token auth with its own token (unless
``auth="disabled"`` is chosen), and a state file under ``$EDGERAY_HOME/clusters/<name>/`` (default
``~/.edgeray``) recording every PID it started. Every ``ray start`` runs in a new session, so teardown finds
the daemons and the workers they forked by session id and never touches another Ray cluster on the host.
All waits are bounded; a failure part-way through ``up`` tears down what was started and reports the log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from edgeray.atomic import write_atomic
from edgeray.errors import EdgerayError
from edgeray.topology import NODE_LABEL, Node, Topology
from edgeray.wan import WAN_ENV

if TYPE_CHECKING:
    from edgeray.wan.netns import WanState

LOOPBACK_IP = "127.0.0.2"  # not 127.0.0.1: Ray rewrites that to the host's main address
ROLE_LABEL = "edgeray.io/role"
CLUSTER_LABEL = "edgeray.io/cluster"
RAYLET_RSS_MB = 350  # measured 250-340 MiB per extra raylet
HEAD_RSS_MB = 1900  # head with dashboard, ~1.8 GiB
START_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 20.0


class ClusterError(EdgerayError):
    """The cluster could not be started, reached, checked or stopped; the message says why and what to do."""


@dataclass
class ClusterState:
    """What ``up`` recorded; saved as JSON (atomically) and read by status/env/down."""

    name: str
    topology_path: str
    topology_name: str
    address: str
    """GCS address, ``host:port``: what ``ray.init(address=...)`` and ``serve run -a`` take."""
    dashboard_url: str
    """Job API / dashboard, ``http://host:port``: what ``ray job submit --address`` takes."""
    serve_port: int
    """HTTP port reserved for Ray Serve on this cluster."""
    auth_mode: str
    token_path: str | None
    temp_dir: str | None
    attached: bool = False
    """True when the cluster was not started by edgeray (``down`` then only forgets it)."""
    sessions: dict[str, int] = field(default_factory=dict)
    """Node name (or ``head``) -> session id of the processes ``ray start`` launched for it."""
    pids: dict[str, list[int]] = field(default_factory=dict)
    """Node name (or ``head``) -> PIDs seen right after start (daemons)."""
    created_at: float = 0.0
    tls_dir: str | None = None
    """With ``up(tls=True)``: the cluster's CA and per-raylet certificates (edgeray.tls); None = plain gRPC."""
    wan: dict[str, Any] | None = None
    """With ``up(wan=True)``: the namespaces, addresses and router of the packet-level network
    (edgeray.wan.netns.WanState as a dict); None = every raylet on loopback."""

    def env(self) -> dict[str, str]:
        """Environment that points Ray's CLIs and ``ray.init`` at this cluster."""
        env = {
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_DASHBOARD_ADDRESS": self.dashboard_url,  # `serve status/deploy/shutdown` read this one
            "RAY_AUTH_MODE": self.auth_mode,
            "EDGERAY_CLUSTER": self.name,
            "EDGERAY_TOPOLOGY": self.topology_path,
            "EDGERAY_SERVE_PORT": str(self.serve_port),
        }
        if self.token_path:
            env["RAY_AUTH_TOKEN_PATH"] = self.token_path
        if self.wan:
            env[WAN_ENV] = self.name
        if self.tls_dir:  # drivers present the cluster's client certificate (mutual TLS)
            from edgeray import tls

            d = Path(self.tls_dir)
            env |= tls.env(d / "ca.crt", tls.Issued(d / "nodes" / "client.crt", d / "nodes" / "client.key"))
        return env


# --------------------------------------------------------------------------------------------- state files
def edgeray_home() -> Path:
    return Path(os.environ.get("EDGERAY_HOME", Path.home() / ".edgeray")).expanduser()


def state_dir(name: str) -> Path:
    return edgeray_home() / "clusters" / name


def _state_file(name: str) -> Path:
    return state_dir(name) / "cluster.json"


def load_state(name: str) -> ClusterState:
    """The recorded state of cluster ``name``; :class:`ClusterError` lists known clusters otherwise."""
    path = _state_file(name)
    if not path.exists():
        known = list_clusters()
        hint = f"known clusters: {known}" if known else "no clusters are recorded"
        raise ClusterError(f"no edgeray cluster named {name!r} ({path} missing); {hint}")
    try:
        return ClusterState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ClusterError(
            f"{path}: unreadable cluster state ({exc}); remove the file to forget it"
        ) from None


def save_state(state: ClusterState) -> None:
    write_atomic(_state_file(state.name), json.dumps(asdict(state), indent=2))


def list_clusters() -> list[str]:
    root = edgeray_home() / "clusters"
    return sorted(p.parent.name for p in root.glob("*/cluster.json")) if root.exists() else []


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialise up/down of one cluster name across processes."""
    d = state_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClusterError(f"cluster {name!r} is being started or stopped by another process") from None
        yield


# --------------------------------------------------------------------------------------------- processes
# Ports come from below the kernel's ephemeral range (32768+), where Ray's own randomly bound ports and
# outgoing connections live: a port picked there can be taken before the raylet binds it.
PORT_RANGE = (20000, 32000)


class _PortPool:
    """Hands out distinct ports in :data:`PORT_RANGE` that are free on every interface when handed out."""

    def __init__(self) -> None:
        self._candidates = list(range(*PORT_RANGE))
        random.shuffle(self._candidates)  # concurrent `up`s of different clusters rarely race for one port

    def take(self) -> int:
        while self._candidates:
            port = self._candidates.pop()
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("", port))
                except OSError:
                    continue
            return port
        raise ClusterError(f"no free TCP port left in {PORT_RANGE[0]}-{PORT_RANGE[1]}")


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes whose session id is ``sid`` (everything one ``ray start`` launched, workers included)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _cluster_processes(state: ClusterState) -> list[psutil.Process]:
    procs: dict[int, psutil.Process] = {}
    for sid in state.sessions.values():
        for p in session_processes(sid):
            procs[p.pid] = p
    for pids in state.pids.values():
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                # Only a PID still in one of our sessions is ours (PIDs get reused).
                if pid not in procs and os.getsid(pid) in state.sessions.values():
                    procs[pid] = p
    return [p for p in procs.values() if p.pid != os.getpid()]


def _terminate(procs: list[psutil.Process], grace_s: float = 5.0) -> list[psutil.Process]:
    """SIGTERM, wait ``grace_s``, then SIGKILL; returns processes that survived both."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _, alive = psutil.wait_procs(alive, timeout=5.0)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _run_ray_start(
    args: list[str], env: dict[str, str], log: Path, key: str = "head", netns: str | None = None
) -> subprocess.Popen:
    """``ray start`` for the raylet ``key`` (a node name or "head"), with a runtime-env directory of its own
    (see edgeray._raystart: raylets sharing one would delete each other's unpacked working_dir); inside
    network namespace ``netns`` when given (``ip netns exec`` replaces itself with the command, so the
    session id is still the child's PID)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "edgeray._raystart", key, "start", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its daemons inherit this session id: that is how we find them later
        )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------------- up / down
def up(
    topology: Topology,
    *,
    name: str | None = None,
    auth: str = "token",
    object_store_mb: int = 128,
    timeout_s: float = START_TIMEOUT_S,
    dashboard: bool = True,
    progress: Callable[[str], None] | None = None,
    tls: bool = False,
    wan: bool = False,
    head_region: str | None = None,
) -> ClusterState:
    """Start a head plus one labelled raylet per topology node on loopback and wait until all are alive.

    Parameters
    ----------
    topology : the fleet; each node becomes a raylet labelled ``edgeray.io/{region,tier,node,accelerator}``.
    name : cluster name (default: the topology's name); one state dir and one temp dir per name.
    auth : ``"token"`` (a fresh token for this cluster, file mode 0600) or ``"disabled"``.
    object_store_mb : object store per raylet, MiB.
    timeout_s : bound on the whole start; on timeout or any failure, everything started is torn down.
    progress : called with a one-line message as each raylet comes up (starting takes seconds per node).
    tls : Ray's gRPC channels over mutual TLS: a CA for this cluster and a certificate per raylet
        (edgeray.tls); drivers get the ``client`` certificate through :meth:`ClusterState.env`.
    wan : packet-level network emulation (edgeray.wan): every node's raylet in a network namespace of its
        own, joined by a router that enforces every topology link; the head stays in this host's namespace
        (on the router too), beside the drivers. Needs root, /dev/net/tun, iproute2.
    head_region : with ``wan``, the region whose links the head (Ray's control plane) sits behind
        (default: the first cloud-tier region).

    Raises :class:`ClusterError` if the name is in use by a live cluster, memory is short, or a raylet fails.
    """
    if auth not in ("token", "disabled"):
        raise ClusterError(f"auth must be 'token' or 'disabled', got {auth!r}")
    if head_region is not None and not wan:
        raise ClusterError("head_region places the head in the emulated network: it needs wan=True")
    name = name or topology.name
    if wan:
        from edgeray.wan import netns

        netns.check_privileges()
        if head_region is not None:
            topology.region(head_region)  # raises with the valid names
    _check_memory(topology, dashboard)
    with _locked(name):
        previous = _state_file(name)
        if previous.exists():
            old = load_state(name)
            if not old.attached and _cluster_processes(old):
                raise ClusterError(
                    f"cluster {name!r} is already up at {old.address}; run `edgeray down --name {name}` first"
                )
            if old.wan and not old.attached:  # a crashed --wan cluster's router and namespaces
                from edgeray.wan import netns

                netns.teardown(netns.WanState(**old.wan))
            _forget(old)
        return _start(
            topology, name, auth, object_store_mb, timeout_s, dashboard, progress or (lambda _: None), tls,
            wan, head_region,
        )  # fmt: skip


def _check_memory(topology: Topology, dashboard: bool) -> None:
    need = len(topology.nodes) * RAYLET_RSS_MB + (HEAD_RSS_MB if dashboard else 600)
    have = psutil.virtual_memory().available // 2**20
    if need > have:
        raise ClusterError(
            f"topology {topology.name!r} needs about {need} MiB to run {len(topology.nodes)} raylets + a head "
            f"on this machine, but only {have} MiB are available; use a smaller topology"
        )


def _start(
    topology: Topology,
    name: str,
    auth: str,
    object_store_mb: int,
    timeout_s: float,
    dashboard: bool,
    progress: Callable[[str], None],
    use_tls: bool = False,
    use_wan: bool = False,
    head_region: str | None = None,
) -> ClusterState:
    sdir = state_dir(name)
    digest = hashlib.sha1(str(sdir.resolve()).encode()).hexdigest()[:10]
    temp_dir = Path("/tmp") / f"edgeray-{digest}"  # short: Ray's socket paths must fit in 107 bytes
    if temp_dir.exists():
        shutil.rmtree(temp_dir, ignore_errors=True)  # our own, from an earlier run of this name
    shutil.rmtree(sdir / "logs", ignore_errors=True)  # logs of an earlier run of this name
    (sdir / "logs").mkdir(parents=True, exist_ok=True)
    token_path = None
    env = {**os.environ, "RAY_AUTH_MODE": auth, "RAY_USAGE_STATS_ENABLED": "0"}
    # Job entrypoints (`ray job submit -- python x.py`) resolve `python` on the raylets' PATH: make it ours.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_ADDRESS", None)
    # what a shell pointed at another cluster carries (`eval "$(edgeray env)"`) is not this cluster's: its
    # raylets, and so its jobs and Serve apps, get this cluster's own values (below; EDGERAY_WAN on --wan)
    for key in (WAN_ENV, "EDGERAY_CLUSTER", "EDGERAY_TOPOLOGY", "EDGERAY_SERVE_PORT"):
        env.pop(key, None)
    if topology_path := _abs_path(topology):
        env["EDGERAY_TOPOLOGY"] = topology_path
    if auth == "token":
        token_path = str(sdir / "auth_token")
        write_atomic(Path(token_path), secrets.token_hex(32), mode=0o600)
        env["RAY_AUTH_TOKEN_PATH"] = token_path
        env.pop("RAY_AUTH_TOKEN", None)
    ports = _PortPool()
    gcs_port, dash_port, client_port, serve_port = (ports.take() for _ in range(4))
    env |= {"EDGERAY_CLUSTER": name, "EDGERAY_SERVE_PORT": str(serve_port)}  # a job's defaults: this cluster
    ips = {key: LOOPBACK_IP for key in ["head", *(n.name for n in topology.iter_nodes())]}
    wan_state = None
    if use_wan:
        wan_state = _start_wan(topology, name, sdir, head_region, progress)
        ips = {key: wan_state.addresses[key] for key in ips}
        env[WAN_ENV] = name  # every raylet, and so every worker: the fabric stops adding delay
    state = ClusterState(
        name=name,
        topology_path=_abs_path(topology),
        topology_name=topology.name,
        address=f"{ips['head']}:{gcs_port}",
        dashboard_url=f"http://{ips['head']}:{dash_port}",
        serve_port=serve_port,
        auth_mode=auth,
        token_path=token_path,
        temp_dir=str(temp_dir),
        created_at=time.time(),
        tls_dir=str(sdir / "tls") if use_tls else None,
        wan=asdict(wan_state) if wan_state else None,
    )
    save_state(state)  # recorded before anything starts, so `down` can always clean up
    node_env: dict[str, dict[str, str]] = {}  # per raylet: its own certificate
    if use_tls:
        node_env = issue_certificates(state, topology)
        env |= state.env()  # the CA and the client certificate, for what `ray start` runs itself

    def common(key: str, labels: dict[str, str]) -> list[str]:
        return [
            f"--node-ip-address={ips[key]}",
            f"--temp-dir={temp_dir}",
            f"--node-manager-port={ports.take()}",
            f"--object-manager-port={ports.take()}",
            f"--metrics-export-port={ports.take()}",
            f"--dashboard-agent-listen-port={ports.take()}",
            f"--dashboard-agent-grpc-port={ports.take()}",
            f"--runtime-env-agent-port={ports.take()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--object-store-memory={object_store_mb * 2**20}",
            "--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()),
            "--disable-usage-stats",
        ]

    def node_args(node: Node) -> list[str]:
        return [
            f"--address={state.address}",
            f"--num-cpus={node.cpus}",
            "--num-gpus=0",
            f"--memory={int(node.memory_gb * 2**30)}",
            "--include-log-monitor=false",  # the head's monitor already tails the shared session logs
            *common(node.name, {**node.labels, ROLE_LABEL: "node", CLUSTER_LABEL: name}),
        ]

    logs_dir = sdir / "logs"
    deadline = time.monotonic() + timeout_s
    try:
        head_args = [
            "--head",
            f"--port={gcs_port}",
            f"--ray-client-server-port={client_port}",
            f"--include-dashboard={str(dashboard).lower()}",
            f"--dashboard-host={ips['head']}",
            f"--dashboard-port={dash_port}",
            "--num-cpus=0",  # the head schedules nothing of the topology's
            "--num-gpus=0",
            "--memory=" + str(2**30),
            *common("head", {ROLE_LABEL: "head", CLUSTER_LABEL: name}),
        ]
        first = {"head": head_args}
        _start_processes(state, first, env, logs_dir, deadline, progress=progress, envs=node_env)
        pending = {node.name: node for node in topology.iter_nodes()}
        for attempt in range(2):  # one retry: a port can still be taken between our check and Ray's bind
            failed = _start_processes(
                state,
                {n: node_args(node) for n, node in pending.items()},
                env,
                logs_dir,
                deadline,
                raise_on_failure=attempt == 1,
                progress=progress,
                envs=node_env,
            )
            pending = {n: pending[n] for n in failed}
            if not pending:
                break
        wait_for_nodes(
            state, expected=len(topology.nodes) + len(first), timeout_s=max(1.0, deadline - time.monotonic())
        )
        for key, sid in state.sessions.items():
            state.pids[key] = sorted(p.pid for p in session_processes(sid))
        save_state(state)
        return state
    except BaseException:
        down(name, _locked_already=True, keep_logs=True)  # Ray's own logs stay in temp_dir for diagnosis
        raise


def _start_wan(
    topology: Topology, name: str, sdir: Path, head_region: str | None, progress: Callable[[str], None]
) -> WanState:
    """Namespaces, router and addresses for a ``--wan`` cluster (edgeray.wan.netns)."""
    from edgeray.wan import netns

    key = str(sdir.resolve())
    t0 = time.monotonic()
    plan = netns.wan_plan(topology, cluster_key=key, subnet=netns.pick_subnet(key), head_region=head_region)
    wan = netns.setup(plan, sdir / "wan")
    progress(
        f"network: {len(wan.namespaces)} namespaces in {netns.NETWORK}.{wan.subnet}.0/24, head behind "
        f"{wan.head_region}, router {wan.priority} ({time.monotonic() - t0:.1f} s)"
    )
    return wan


def issue_certificates(state: ClusterState, topology: Topology) -> dict[str, dict[str, str]]:
    """A new CA for ``state``'s cluster and a certificate per raylet (``head`` and every topology node) and
    for drivers (``client``), each valid for the loopback addresses the cluster uses; returns each raylet's
    TLS environment."""
    from edgeray import tls

    assert state.tls_dir is not None
    d = Path(state.tls_dir)
    ca = tls.issue_ca(d, state.name)
    addresses = [LOOPBACK_IP, "127.0.0.1", "localhost"]
    if state.wan:  # every address of the emulated network, the host's (drivers) included
        addresses += list(state.wan["addresses"].values())
    tls.issue_node(d, ca, "client", addresses)
    return {
        key: tls.env(ca.cert, tls.issue_node(d, ca, key, addresses))
        for key in ["head", *(n.name for n in topology.iter_nodes())]
    }


def _start_processes(
    state: ClusterState,
    args: dict[str, list[str]],
    env: dict[str, str],
    logs_dir: Path,
    deadline: float,
    *,
    raise_on_failure: bool = True,
    progress: Callable[[str], None] = lambda _: None,
    envs: dict[str, dict[str, str]] | None = None,
) -> list[str]:
    """Run ``ray start`` for each key in turn; returns the keys that failed (their processes killed).
    ``envs``: per key, variables on top of ``env`` (a raylet's own certificate).

    In turn, not concurrently: raylets sharing one session dir race for the same unix socket names and
    one of them aborts with "bind: Address already in use".
    """
    failed = []
    for i, (key, key_args) in enumerate(args.items(), 1):
        t0 = time.monotonic()
        log = logs_dir / f"{key}.log"
        netns = state.wan["namespaces"].get(key) if state.wan else None
        proc = _run_ray_start(key_args, {**env, **(envs or {}).get(key, {})}, log, key, netns)
        state.sessions[key] = proc.pid
        save_state(state)
        try:
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise ClusterError(
                f"`ray start` for {key} did not finish in time; log {log}:\n" + _tail(log)
            ) from None
        if rc != 0:
            if raise_on_failure:
                raise ClusterError(f"`ray start` for {key} failed (exit {rc}); log {log}:\n" + _tail(log))
            _terminate(session_processes(state.sessions.pop(key)))
            failed.append(key)
            progress(f"{key}: `ray start` failed (exit {rc}), will retry")
        else:
            progress(f"{key} up ({i}/{len(args)}, {time.monotonic() - t0:.1f} s)")
    return failed


def _abs_path(topology: Topology) -> str:
    return str(Path(topology.path).resolve()) if topology.path and Path(topology.path).exists() else ""


def wait_for_nodes(state: ClusterState, *, expected: int, timeout_s: float) -> list[dict[str, Any]]:
    """Poll the GCS until ``expected`` nodes are alive; :class:`ClusterError` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    nodes: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(ClusterError):
            nodes = [n for n in probe_nodes(state.address, state.env()) if n["alive"]]
            if len(nodes) >= expected:
                return nodes
        time.sleep(0.5)
    raise ClusterError(
        f"cluster {state.name!r}: only {len(nodes)} of {expected} nodes alive after {timeout_s:.0f} s; "
        f"logs in {state_dir(state.name) / 'logs'}"
    )


def down(
    name: str, *, grace_s: float = 5.0, keep_logs: bool = False, _locked_already: bool = False
) -> list[int]:
    """Stop exactly the processes cluster ``name`` started and forget it. Idempotent.

    Returns the PIDs that were stopped (empty when nothing was running). An attached cluster is only
    forgotten. Raises :class:`ClusterError` if a process survives SIGKILL.
    """
    if not _state_file(name).exists():
        return []
    ctx = contextlib.nullcontext() if _locked_already else _locked(name)
    with ctx:
        state = load_state(name)
        stopped: list[int] = []
        survivors: list[psutil.Process] = []
        if not state.attached:
            # Everything at once: one grace period for the whole cluster, not one per node.
            procs = _cluster_processes(state)
            stopped = [p.pid for p in procs]
            survivors = _terminate(procs, grace_s)
        if state.wan and not state.attached:
            from edgeray.wan import netns

            netns.teardown(netns.WanState(**state.wan))
        if survivors:
            raise ClusterError(f"cluster {name!r}: processes {[p.pid for p in survivors]} survived SIGKILL")
        _forget(state, keep_logs=keep_logs)
        return sorted(set(stopped))


def rotate(
    name: str, *, timeout_s: float = START_TIMEOUT_S, progress: Callable[[str], None] | None = None
) -> ClusterState:
    """New credentials for cluster ``name``: a new auth token and, on a TLS cluster, a new CA and new
    certificates for every raylet and for drivers. Ray reads both when a process starts, so the cluster's
    processes are stopped and started again with them (same topology and settings; running jobs and actors
    end, and its addresses change: run ``eval "$(edgeray env)"`` again). The old token and certificates
    are refused from then on."""
    state = load_state(name)
    if state.attached:
        raise ClusterError(
            f"cluster {name!r} was attached, not started by edgeray: its credentials are not ours"
        )
    if state.auth_mode != "token" and not state.tls_dir:
        raise ClusterError(f"cluster {name!r} has neither token auth nor TLS: there is nothing to rotate")
    if not state.topology_path or not Path(state.topology_path).exists():
        raise ClusterError(
            f"cluster {name!r}: its topology file {state.topology_path!r} is gone; cannot restart it"
        )
    from edgeray.topology import load_topology

    topology = load_topology(state.topology_path)
    say = progress or (lambda _: None)
    say(f"stopping {name} to restart it with new credentials")
    down(name)
    return up(topology, name=name, auth=state.auth_mode, timeout_s=timeout_s, progress=progress,
              tls=state.tls_dir is not None, wan=state.wan is not None,
              head_region=state.wan["head_region"] if state.wan else None)  # fmt: skip


def _forget(state: ClusterState, keep_logs: bool = False) -> None:
    if state.temp_dir and not state.attached and not keep_logs:
        shutil.rmtree(state.temp_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        _state_file(state.name).unlink()


def is_alive(state: ClusterState) -> bool:
    """True if any process of a cluster edgeray started is still running (attached: the GCS answers)."""
    if state.attached:
        try:
            probe_nodes(state.address, state.env(), timeout_s=5)
            return True
        except ClusterError:
            return False
    return bool(_cluster_processes(state))


def use_cluster(state: ClusterState) -> None:
    """Point this process at ``state``'s cluster: env vars for address/auth, and Ray's cached auth config.

    Ray caches ``RAY_AUTH_MODE`` and the token when it is imported, so setting the variables alone is not
    enough in a process that already imported ray; this refreshes both caches.
    """
    os.environ.update(state.env())
    if not state.token_path:
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    if not state.wan:
        os.environ.pop(WAN_ENV, None)  # left by another cluster: this one's network is loopback
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def connect(
    topology: Topology, *, name: str, progress: Callable[[str], None] = print
) -> tuple[ClusterState, bool]:
    """Make this process (a notebook, a script) a Ray driver for ``topology`` across several steps; pair
    with :func:`disconnect`. Uses the cluster this environment points at (``EDGERAY_CLUSTER``, set by
    ``eval "$(edgeray env)"``) when it is alive and runs ``topology``; otherwise starts one named ``name``.
    Returns the cluster's state and whether this call started it."""
    import logging

    import ray

    current = os.environ.get("EDGERAY_CLUSTER")
    state: ClusterState | None = None
    if current and current in list_clusters():
        found = load_state(current)
        if found.topology_name == topology.name and is_alive(found):
            state = found
            progress(f"using cluster {current} ({found.address})")
    started = state is None
    if state is None:
        state = up(topology, name=name, progress=progress)
    use_cluster(state)
    ray.init(logging_level=logging.ERROR, log_to_driver=False)
    return state, started


def disconnect(state: ClusterState, started: bool) -> None:
    """End :func:`connect`: leave the cluster, and stop it if ``connect`` started it."""
    import ray

    ray.shutdown()
    if started:
        down(state.name)


@contextlib.contextmanager
def driver(
    topology: Topology, *, name: str, progress: Callable[[str], None] = print
) -> Iterator[ClusterState | None]:
    """Run the body as a Ray driver: on the cluster this process already belongs to (inside `ray job
    submit`, or with RAY_ADDRESS from `eval "$(edgeray env)"`), else on a fresh local cluster for
    ``topology`` named ``name`` that is torn down afterwards. Yields the started cluster's state or None."""
    import logging

    import ray

    if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.ERROR, log_to_driver=False)
        try:
            yield None
        finally:
            ray.shutdown()
        return
    progress(f"starting {topology.name!r} as local cluster {name} ...")
    state = up(topology, name=name, progress=lambda m: progress("  " + m))
    saved = dict(os.environ)
    try:
        use_cluster(state)
        ray.init(logging_level=logging.ERROR, log_to_driver=False)
        yield state
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        down(name)


# --------------------------------------------------------------------------------------------- probing
def probe_nodes(
    address: str, env: dict[str, str], *, timeout_s: float = PROBE_TIMEOUT_S
) -> list[dict[str, Any]]:
    """Ask the GCS at ``address`` for its nodes: ``[{node_id, alive, labels, resources, ip}]``.

    Runs in a child process with a hard timeout, because a Ray client given the wrong token (or a GCS
    that is not Ray) retries forever. Raises :class:`ClusterError` when it cannot be reached in time.
    """
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=min(3.0, timeout_s)):
            pass
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot reach a Ray GCS at {address!r}: {exc}") from None
    cmd = [sys.executable, "-m", "edgeray._probe", address]
    try:
        out = subprocess.run(
            cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise ClusterError(
            f"the Ray GCS at {address!r} did not answer within {timeout_s:.0f} s "
            '(wrong auth token, or TLS settings? `eval "$(edgeray env)"` sets both for an edgeray cluster; '
            "elsewhere RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH and RAY_USE_TLS / RAY_TLS_*)"
        ) from None
    if out.returncode != 0:
        detail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise ClusterError(f"could not list the nodes of the Ray cluster at {address!r}: {detail}")
    return json.loads(out.stdout)


# --------------------------------------------------------------------------------------------- attach / check
def missing_labels(topology: Topology, nodes: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Topology node -> the labels no alive Ray node carries for it (empty dict when all are present)."""
    missing: dict[str, dict[str, str]] = {}
    alive = [n for n in nodes if n["alive"]]
    for node in topology.iter_nodes():
        wanted = node.labels
        # The Ray node that claims this topology node's name, else the best partial match.
        same = [n for n in alive if n["labels"].get(NODE_LABEL) == node.name] or alive
        best = min(
            ({k: v for k, v in wanted.items() if n["labels"].get(k) != v} for n in same),
            key=len,
            default=dict(wanted),
        )
        if best:
            missing[node.name] = best
    return missing


def attach(
    topology: Topology,
    address: str,
    *,
    name: str | None = None,
    auth: str | None = None,
    token_path: str | None = None,
    dashboard_url: str | None = None,
) -> ClusterState:
    """Record an existing Ray cluster at ``address`` after checking it carries every topology label.

    Raises :class:`ClusterError` naming each topology node and the labels missing for it.
    """
    name = name or topology.name
    auth = auth or os.environ.get("RAY_AUTH_MODE", "token" if token_path else "disabled")
    state = ClusterState(
        name=name,
        topology_path=_abs_path(topology),
        topology_name=topology.name,
        address=address,
        dashboard_url=dashboard_url or f"http://{address.rpartition(':')[0]}:8265",
        serve_port=8000,
        auth_mode=auth,
        token_path=token_path or os.environ.get("RAY_AUTH_TOKEN_PATH"),
        temp_dir=None,
        attached=True,
        created_at=time.time(),
    )
    nodes = probe_nodes(address, state.env())
    missing = missing_labels(topology, nodes)
    if missing:
        lines = [
            f"  {node}: " + ", ".join(f"{k}={v}" for k, v in labels.items())
            for node, labels in missing.items()
        ]
        raise ClusterError(
            f"the Ray cluster at {address} lacks labels that topology {topology.name!r} needs "
            f"({len(missing)} of {len(topology.nodes)} nodes unmatched):\n" + "\n".join(lines)
        )
    with _locked(name):
        if _state_file(name).exists() and is_alive(load_state(name)):
            raise ClusterError(f"the name {name!r} is taken by a running cluster; pass another name")
        save_state(state)
    return state


def status(name: str) -> list[dict[str, Any]]:
    """Nodes of cluster ``name`` as dicts (node_id, alive, labels, resources); raises if unreachable."""
    state = load_state(name)
    return probe_nodes(state.address, state.env())

"""The ``edgeray`` command: validate topologies and run labelled local edge clusters.

    edgeray validate clusters/local.yaml
    edgeray up [FILE|PRESET] [--name N]      edgeray status [--name N]
    eval "$(edgeray env [--name N])"         edgeray down [--name N]
    edgeray demo [FILE|PRESET]               (up -> the main job -> down)
    edgeray up --tls / edgeray rotate [--name N]   (mutual TLS on Ray's gRPC; new credentials)
    edgeray up --wan ; edgeray exec --node NODE -- CMD   (packet-level links; a client inside a node's network)
    edgeray monitor [--name N] [--check]     (Prometheus + Grafana with edgeray's dashboards and alerts)
    edgeray sim FILE|PRESET|nodes=N,regions=R,... [--workload hierarchical|sync|diloco|streaming-diloco|gossip|async|ssp|serving]
                                             (no cluster: the fleet simulator)

Errors a user can fix (a bad topology, an unreachable cluster, an unsatisfiable placement) print one
message and exit 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from edgeray import cluster as cl
from edgeray.atomic import write_atomic
from edgeray.errors import EdgerayError
from edgeray.topology import Topology, load_topology, preset_names, resolve_topology_path

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`EdgerayError` into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgerayError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", markup=True)
            sys.exit(2)

    return wrapper


DILOCO_H = 20
"""edgeray.train.strategies.diloco's default h (tests/test_sim.py checks they agree)."""


def _topology(arg: str | None) -> Topology:
    return load_topology(resolve_topology_path(arg))


def _cluster_name(name: str | None) -> str:
    """``--name``, else $EDGERAY_CLUSTER, else the only recorded cluster; errors list the choices."""
    if name:
        return name
    if os.environ.get("EDGERAY_CLUSTER"):
        return os.environ["EDGERAY_CLUSTER"]
    known = cl.list_clusters()
    if len(known) == 1:
        return known[0]
    if not known:
        raise cl.ClusterError("no edgeray clusters are recorded; start one with `edgeray up`")
    raise cl.ClusterError(f"several clusters are recorded ({', '.join(known)}); pass --name")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeray")
def main() -> None:
    """edgeray: decentralized LLM training and inference on edge networks, on Ray."""


@main.command()
@click.argument("file", required=False)
@_friendly
def validate(file: str | None) -> None:
    """Check a topology FILE (or preset name) and print a one-screen summary."""
    topo = _topology(file)
    console.print(
        f"[bold]{topo.name}[/]  {topo.path}  ({topo.shape()}, {len(topo.regions)} regions, "
        f"{len(topo.nodes)} nodes)"
    )
    if topo.description:
        console.print(topo.description)
    table = Table(box=None, pad_edge=False)
    for col in ("region", "tier", "nodes", "cpus", "mem GiB", "intra link (ms, Mbit/s, loss)"):
        table.add_column(col)
    for r in topo.regions.values():
        link = r.intra_link
        table.add_row(
            r.name,
            r.tier.value,
            ", ".join(n.name for n in r.nodes),
            str(sum(n.cpus for n in r.nodes)),
            f"{sum(n.memory_gb for n in r.nodes):g}",
            f"{link.latency_ms:g} ±{link.jitter_ms:g}, {link.bandwidth_mbps:g}, {link.loss:g}",
        )
    console.print(table)
    links = Table(box=None, pad_edge=False)
    for col in ("inter-region link", "latency ms", "jitter ms", "Mbit/s", "loss"):
        links.add_column(col)
    for pair, link in topo.inter_links.items():
        a, b = sorted(pair)
        links.add_row(
            f"{a} <-> {b}",
            f"{link.latency_ms:g}",
            f"{link.jitter_ms:g}",
            f"{link.bandwidth_mbps:g}",
            f"{link.loss:g}",
        )
    console.print(links)
    for region in topo.regions:
        order = ", ".join(f"{r} {ms:g}" for r, ms in topo.nearest_regions(region) if r != region)
        console.print(f"nearest from {region} (ms): {order}")
    if topo.source:
        console.print(f"source: {topo.source}")
    console.print("[green]valid[/]")


@main.command()
@click.argument("file", required=False)
@click.option("--name", help="cluster name (default: the topology's name)")
@click.option(
    "--auth",
    type=click.Choice(["token", "disabled"]),
    default="token",
    show_default=True,
    help="Ray token auth for this cluster (a fresh token each time)",
)
@click.option("--address", help="attach to an existing Ray cluster (GCS host:port) instead of starting one")
@click.option("--object-store-mb", type=click.IntRange(75, 65536), default=128, show_default=True)
@click.option("--timeout-s", type=click.FloatRange(5, 3600), default=cl.START_TIMEOUT_S, show_default=True)
@click.option(
    "--tls",
    is_flag=True,
    help="Ray's gRPC over mutual TLS: a CA for this cluster and a certificate per raylet (keys 0600); "
    "`edgeray env` hands drivers theirs; `edgeray rotate` re-issues them",
)
@click.option(
    "--wan",
    is_flag=True,
    help="packet-level network: each raylet in its own network namespace behind a router that enforces "
    "every topology link (latency, jitter, loss, rate), so Ray's own traffic, Serve's HTTP and the fabric "
    "all pay them (root, /dev/net/tun, iproute2)",
)
@click.option(
    "--head-region",
    help="with --wan: the region the head (Ray's control plane) sits in (default: the first cloud region)",
)
@_friendly
def up(
    file: str | None,
    name: str | None,
    auth: str,
    address: str | None,
    object_store_mb: int,
    timeout_s: float,
    tls: bool,
    wan: bool,
    head_region: str | None,
) -> None:
    """Start (or, with --address, attach to) a labelled Ray cluster for a topology FILE or preset."""
    topo = _topology(file)
    t0 = time.monotonic()
    if address:
        if tls or wan:
            flag = "--tls" if tls else "--wan"
            raise cl.ClusterError(f"{flag} starts a cluster of its own; it cannot attach (--address)")
        state = cl.attach(topo, address, name=name)
        console.print(f"attached to {address}: all {len(topo.nodes)} topology nodes' labels are present")
    else:
        if wan:
            from edgeray.wan.netns import check_privileges

            check_privileges()  # before saying anything is starting
        err_console.print(f"starting {len(topo.nodes)} raylets + head for {topo.name!r} ...")
        state = cl.up(
            topo,
            name=name,
            auth=auth,
            object_store_mb=object_store_mb,
            timeout_s=timeout_s,
            progress=lambda msg: err_console.print(f"  {msg}"),
            tls=tls,
            wan=wan,
            head_region=head_region,
        )
        console.print(
            f"cluster [bold]{state.name}[/] up in {time.monotonic() - t0:.1f} s: "
            f"{len(topo.nodes)} nodes in {len(topo.regions)} regions"
        )
    console.print(f"  GCS address   {state.address}")
    console.print(f"  dashboard/job {state.dashboard_url}")
    console.print(
        f"  auth          {state.auth_mode}" + (f" (token in {state.token_path})" if state.token_path else "")
    )
    if state.tls_dir:
        console.print(f"  tls           mutual TLS on Ray's gRPC (CA and certificates in {state.tls_dir})")
    if state.wan:
        w = state.wan
        console.print(
            f"  network       packet-level: a namespace per node ({min(w['namespaces'].values())}..), the "
            f"head and this host's drivers behind {w['head_region']}; router stats in {w['router_dir']}/stats.json"
        )
    console.print(
        f'  reach it:     eval "$(edgeray env --name {state.name})"   then ray job submit / serve run'
    )
    console.print(f"  stop it:      edgeray down --name {state.name}")


@main.command()
@click.option("--name", help="cluster name (default: $EDGERAY_CLUSTER or the only recorded cluster)")
@_friendly
def status(name: str | None) -> None:
    """Print the nodes of a cluster: region, tier, labels, health, resources."""
    cname = _cluster_name(name)
    state = cl.load_state(cname)
    nodes = cl.probe_nodes(state.address, state.env())
    table = Table(title=f"{cname} @ {state.address}")
    for col in ("node", "region", "tier", "role", "health", "CPU", "mem GiB", "other labels"):
        table.add_column(col)
    shown = {
        "edgeray.io/node",
        "edgeray.io/region",
        "edgeray.io/tier",
        "edgeray.io/role",
        "ray.io/node-id",
        "edgeray.io/cluster",
    }
    for n in sorted(
        nodes,
        key=lambda n: (
            n["labels"].get("edgeray.io/role") != "head",
            n["labels"].get("edgeray.io/region", ""),
            n["labels"].get("edgeray.io/node", ""),
        ),
    ):
        lab = n["labels"]
        table.add_row(
            lab.get("edgeray.io/node", n["name"] or n["node_id"][:8]),
            lab.get("edgeray.io/region", "-"),
            lab.get("edgeray.io/tier", "-"),
            lab.get("edgeray.io/role", "-"),
            "alive" if n["alive"] else "[red]dead[/]",
            f"{n['resources'].get('CPU', 0):g}",
            f"{n['resources'].get('memory', 0) / 2**30:.1f}",
            ", ".join(f"{k}={v}" for k, v in sorted(lab.items()) if k not in shown),
        )
    console.print(table)
    if state.topology_path and os.path.exists(state.topology_path):
        missing = cl.missing_labels(load_topology(state.topology_path), nodes)
        for node, labels in missing.items():
            console.print(f"[red]missing[/] {node}: " + ", ".join(f"{k}={v}" for k, v in labels.items()))
    if state.wan:
        from edgeray.wan import netns

        stats = netns.router_stats(netns.WanState(**state.wan))
        paths = stats.get("paths", [])
        console.print(
            f"network: packet-level router {state.wan['priority'] or ''}; "
            + (
                f"{stats.get('cpu_s', 0):.1f} CPU s over {stats.get('uptime_s', 0):.0f} s, "
                f"{sum(p['packets'] for p in paths)} packets, {sum(p['lost'] for p in paths)} lost (link loss), "
                f"{sum(p['queue_drops'] for p in paths)} queue drops, late by {stats.get('late_ms_mean', 0):.3f} ms "
                f"mean / {stats.get('late_ms_max', 0):.1f} ms worst"
                if stats
                else "no statistics yet"
            )
        )


@main.command(
    name="exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.option("--name", help="cluster name (default: $EDGERAY_CLUSTER or the only recorded cluster)")
@click.option("--node", required=True, help="the topology node whose network namespace runs CMD")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@_friendly
def exec_(name: str | None, node: str, cmd: tuple[str, ...]) -> None:
    """Run CMD inside a node's network namespace of a --wan cluster: a client there (curl, the openai
    client, vLLM's benchmark) reaches the cluster through that node's links, as a caller in its region
    would. Ray drivers run on this host, beside the head (no --node needed)."""
    state = cl.load_state(_cluster_name(name))
    if not state.wan:
        raise cl.ClusterError(
            f"cluster {state.name!r} was not started with --wan: every node shares this host's network, "
            "so run CMD directly"
        )
    namespaces = state.wan["namespaces"]
    if node not in namespaces:
        raise cl.ClusterError(
            f"--node {node!r} is not a node of cluster {state.name!r}; nodes: {sorted(namespaces)}"
        )
    env_vars = {**os.environ, **state.env()}
    argv = ["ip", "netns", "exec", namespaces[node], *cmd]
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env_vars)


@main.command()
@click.option("--name", help="cluster name (default: $EDGERAY_CLUSTER or the only recorded cluster)")
@_friendly
def env(name: str | None) -> None:
    """Print shell exports so that `eval "$(edgeray env)"` points ray job submit / serve run at a cluster."""
    state = cl.load_state(_cluster_name(name))
    for key, value in state.env().items():
        click.echo(f"export {key}={shlex.quote(value)}")
    if not state.token_path:
        click.echo("unset RAY_AUTH_TOKEN_PATH RAY_AUTH_TOKEN")
    if not state.wan:
        click.echo(f"unset {cl.WAN_ENV}")  # left by a --wan cluster's exports: this one is on loopback


@main.command()
@click.option("--name", help="cluster name (default: $EDGERAY_CLUSTER or the only recorded cluster)")
@_friendly
def rotate(name: str | None) -> None:
    """New auth token and (on a --tls cluster) new CA and certificates; restarts the cluster with them."""
    cname = _cluster_name(name)
    t0 = time.monotonic()
    state = cl.rotate(cname, progress=lambda msg: err_console.print(f"  {msg}"))
    console.print(
        f"cluster [bold]{cname}[/] restarted with new credentials in {time.monotonic() - t0:.1f} s: "
        + ("a new token" if state.token_path else "")
        + (f" and a new CA and certificates in {state.tls_dir}" if state.tls_dir else "")
        + f'; the old ones are refused.\n  reach it again: eval "$(edgeray env --name {cname})"'
    )


@main.command()
@click.option("--name", help="cluster name (default: $EDGERAY_CLUSTER or the only recorded cluster)")
@click.option(
    "--check", is_flag=True, help="run every dashboard panel's query against the running Prometheus"
)
@click.option("--stop", is_flag=True, help="stop this cluster's Prometheus and Grafana (their data stays)")
@click.option(
    "--grafana/--no-grafana", default=True, show_default=True, help="also start Grafana if installed"
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="--check: also write the rows here"
)
@_friendly
def monitor(name: str | None, check: bool, stop: bool, grafana: bool, json_path: str | None) -> None:
    """Prometheus (and Grafana) for a local cluster, with edgeray's dashboards and alert rules."""
    from edgeray.monitoring import monitor as mon

    cname = _cluster_name(name)
    if stop:
        stopped = mon.stop(cname)
        console.print(f"cluster {cname}: " + (f"stopped {len(stopped)} monitoring processes" if stopped
                                               else "no monitoring running"))  # fmt: skip
        return
    if check:
        running = mon.load(cname)
        if running is None:
            raise mon.MonitorError(
                f"cluster {cname!r} is not monitored: run `edgeray monitor --name {cname}`"
            )
        now = time.time()
        _print_check(mon.check(running.prometheus_url, running.started_at, now), json_path)
        pngs = mon.render(running.prometheus_url, running.started_at, now, Path(running.dir) / "dashboards")
        console.print("the dashboards as pictures (Prometheus's data, as Grafana would draw it): "
                      + ", ".join(map(str, pngs)))  # fmt: skip
        rules = mon.rules_loaded(running.prometheus_url)
        console.print(
            "alert rules: " + ", ".join(f"{r['name']} ({r['health']}, {r['state']})" for r in rules)
        )
        return
    m = mon.start(cname, grafana=grafana, progress=console.print)
    console.print(
        f"monitoring {cname}: Prometheus {m.prometheus_url}"
        + (f", Grafana {m.grafana_url}" if m.grafana_url else "")
        + f"\n  check the panels: edgeray monitor --name {cname} --check"
        + f"\n  stop:             edgeray monitor --name {cname} --stop   (edgeray down stops it too)"
    )


def _print_check(rows: list[dict[str, Any]], json_path: str | None) -> None:
    table = Table("dashboard", "panel", "series", "data", "fed by")
    for r in rows:
        table.add_row(r["dashboard"], r["panel"], str(r["series"]), "yes" if r["has_data"] else "[red]none[/]",
                      r["fed_by"])  # fmt: skip
    console.print(table)
    console.print(f"{sum(r['has_data'] for r in rows)}/{len(rows)} panels have data")
    if json_path:
        write_atomic(Path(json_path), json.dumps(rows, indent=2))


@main.command()
@click.option("--name", help="cluster name (default: $EDGERAY_CLUSTER or the only recorded cluster)")
@click.option("--keep-logs", is_flag=True, help="keep Ray's temp dir (logs) after stopping")
@_friendly
def down(name: str | None, keep_logs: bool) -> None:
    """Stop exactly the processes of one edgeray cluster (idempotent; other Ray clusters are untouched)."""
    if not (name or os.environ.get("EDGERAY_CLUSTER") or cl.list_clusters()):
        console.print("no edgeray clusters are recorded: nothing to stop")
        return
    cname = _cluster_name(name)
    stopped = cl.down(cname, keep_logs=keep_logs)
    console.print(
        f"cluster {cname}: " + (f"stopped {len(stopped)} processes" if stopped else "nothing running")
    )


@main.command()
@click.argument("kind", type=click.Choice(["launcher", "kuberay", "tls-ca", "onnx"]))
@click.argument("file", required=False)
@click.argument("out", required=False)
@click.option("--int8", "int8", is_flag=True, help="onnx: dynamic int8 weights (MatMul and embedding)")
@click.option(
    "--int4", "int4", is_flag=True, help="onnx: 4-bit weight blocks for the MatMuls, int8 embedding"
)
@_friendly
def export(kind: str, file: str | None, out: str | None, int8: bool, int4: bool) -> None:
    """Print a Ray cluster-launcher YAML or a KubeRay RayCluster for a topology (one group per region), or
    write a checkpoint as ONNX with a KV cache for the device tier:

    \b
      edgeray export launcher [TOPOLOGY]
      edgeray export kuberay [TOPOLOGY]
      edgeray export tls-ca [TOPOLOGY] [DIR]   (the exported cluster's CA; default ~/.edgeray/tls/NAME)
      edgeray export onnx CHECKPOINT OUT [--int8 | --int4]
    """
    if kind == "onnx":
        _export_onnx(file, out, int8, int4)
        return
    if kind == "tls-ca":
        _export_ca(file, out)
        return
    if out is not None or int8 or int4:
        raise EdgerayError(f"export {kind} takes one topology; OUT, --int8 and --int4 are for `export onnx`")
    from edgeray import deploy

    topo = _topology(file)
    doc = deploy.launcher_config(topo) if kind == "launcher" else deploy.kuberay_manifest(topo)
    click.echo(deploy.to_yaml(doc, topo, kind), nl=False)


def _export_ca(file: str | None, out: str | None) -> None:
    from edgeray import tls
    from edgeray.deploy import CA_DIR

    topo = _topology(file)
    target = Path(out or Path.home() / ".edgeray" / "tls" / topo.name).expanduser()
    if (target / "ca.key").exists():
        raise EdgerayError(
            f"{target / 'ca.key'} exists: a cluster's CA is not replaced silently (remove it first)"
        )
    ca = tls.issue_ca(target, topo.name)
    # the drivers' certificate beside the CA's folder, not in it: the launcher copies that folder to nodes
    client = tls.issue_node(
        target.with_name(target.name + "-driver"), ca, "client", ["127.0.0.1", "localhost"]
    )
    console.print(
        f"wrote {ca.cert} and {ca.key} (0600), and a driver certificate {client.cert}, {client.key}.\n"
        f"  launcher: `edgeray export launcher` copies {target} to every node (file_mounts).\n"
        f"  KubeRay:  kubectl create secret generic edgeray-{topo.name}-ca --from-file={ca.cert} "
        f"--from-file={ca.key}\n"
        f"  drivers:  RAY_USE_TLS=1 RAY_TLS_SERVER_CERT={client.cert} RAY_TLS_SERVER_KEY={client.key} "
        f"RAY_TLS_CA_CERT={ca.cert}; each node signs its own under {CA_DIR} (edgeray.deploy.NODE_CERT_SCRIPT)"
    )


def _export_onnx(checkpoint: str | None, out: str | None, int8: bool, int4: bool) -> None:
    from edgeray.model.export_onnx import ExportError, export_onnx, size_ratio

    if checkpoint is None or out is None:
        raise ExportError("usage: edgeray export onnx CHECKPOINT OUT [--int8 | --int4]")
    if int8 and int4:
        raise ExportError("--int8 and --int4 exclude each other: pick one format")
    quant = "int8" if int8 else "int4" if int4 else "fp32"
    with console.status(f"exporting {checkpoint} ({quant}) ..."):
        info = export_onnx(checkpoint, out, quant=quant)
    console.print(
        f"wrote {info.path}: {info.architecture}, {quant}, {info.weight_bytes / 1e6:.2f} MB on disk "
        f"({size_ratio(info):.2f}x smaller than fp32's {info.fp32_bytes / 1e6:.2f} MB)"
    )


@main.command()
@click.argument("fleet")
@click.option(
    "--workload",
    type=click.Choice(
        ["hierarchical", "sync", "diloco", "streaming-diloco", "gossip", "async", "ssp", "serving"]
    ),
    default="hierarchical",
    show_default=True,
    help="hierarchical (sync-hier): a local step then a hierarchical all-reduce per round; sync: a local "
    "step then one flat ring over every node; async / ssp: workers and a parameter server; diloco: "
    "--local-steps inner steps then the all-reduce of the pseudo-gradient; streaming-diloco: --fragments "
    "parts of it in turn, each all-reduce overlapping --overlap inner steps; gossip: after each local step "
    "a worker averages with one random other; serving: a request stream per region through the region "
    "router (EASGD: not yet)",
)
@click.option(
    "--local-steps",
    type=click.IntRange(1),
    default=DILOCO_H,
    show_default=True,
    help="diloco, streaming-diloco: inner steps per round (DiLoCo's h)",
)
@click.option(
    "--fragments",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="streaming-diloco: model fragments",
)
@click.option(
    "--overlap",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="streaming-diloco: inner steps an outer all-reduce overlaps before its fragment merges",
)
@click.option("--rounds", type=click.IntRange(1, 1_000_000), default=100, show_default=True)
@click.option(
    "--params",
    type=click.IntRange(1),
    default=1_000_000,
    show_default=True,
    help="model size: float32 values all-reduced per round",
)
@click.option(
    "--compute-s",
    type=click.FloatRange(0),
    default=0.5,
    show_default=True,
    help="one local step on a reference node, modelled seconds",
)
@click.option("--codec", default="none", show_default=True, help="codec on the inter-region ring")
@click.option(
    "--transient",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="probability that a node is a transient straggler in a round",
)
@click.option("--no-churn", is_flag=True, help="every node stays up")
@click.option("--no-jitter", is_flag=True, help="no jitter or loss: every transfer takes its expected time")
@click.option("--bound", type=click.IntRange(0), default=3, show_default=True, help="ssp: steps ahead")
@click.option(
    "--staleness",
    type=click.IntRange(0),
    default=None,
    help="async: drop gradients more than this many versions old (default: never)",
)
@click.option("--requests", type=click.IntRange(1), default=1_000_000, show_default=True, help="serving")
@click.option("--rate", type=float, default=200.0, show_default=True, help="serving: requests per second")
@click.option(
    "--trace",
    type=click.Path(dir_okay=False),
    help="serving: a CSV or Parquet file of arrivals (columns t_s, region) instead of Poisson ones",
)
@click.option("--capacity", type=int, default=16, show_default=True, help="serving: in flight per replica")
@click.option(
    "--nodes-per-replica",
    type=int,
    default=0,
    show_default=True,
    help="serving: replicas per region = ceil(nodes / this); 0: one per region",
)
@click.option("--budget-ms", type=float, default=100.0, show_default=True, help="serving: first-token budget")
@click.option("--tokens", type=int, default=32, show_default=True, help="serving: output tokens per request")
@click.option(
    "--service",
    type=click.Path(dir_okay=False),
    help="serving: a jobs/bench_serve.py summary.json to fit service times to (default: the built-in fit)",
)
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False),
    help="training rounds: a calibration.json of jobs/calibrate_sim.py (per-message overhead, goodput)",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.pass_context
@_friendly
def sim(ctx: click.Context, fleet: str, workload: str, out: str, seed: int, **opts: Any) -> None:
    """Simulate FLEET (a topology file or preset, or a generator spec such as
    nodes=10000,regions=50,stragglers=0.05) without a cluster. hierarchical: training rounds, written as
    OUT/rounds.parquet, summary.json and rounds.png (the model's loss is not simulated). serving: requests
    through the region router, written as OUT/requests.parquet, summary.json and serving.png."""  # fmt: skip
    from pathlib import Path

    from edgeray.sim.engine import SimError

    serving_opts = ("requests", "rate", "trace", "capacity", "nodes_per_replica", "budget_ms", "tokens",
                    "service")  # fmt: skip
    foreign = [
        name
        for name in opts
        if (
            (name in serving_opts) != (workload == "serving")
            or (name == "local_steps" and workload not in ("diloco", "streaming-diloco"))
            or (name in ("fragments", "overlap") and workload != "streaming-diloco")
            or (name == "bound" and workload != "ssp")
            or (name == "staleness" and workload != "async")
            or (name in ("codec", "calibration") and workload in ("async", "ssp", "gossip"))
        )
        and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        raise SimError(f"{flags}: not an option of the {workload} workload")
    t0 = time.perf_counter()
    from edgeray.sim.report import resolve_fleet

    topo = resolve_fleet(fleet)
    if workload == "serving":
        _sim_serving(topo, Path(out), seed, t0, **{k: opts[k] for k in serving_opts})
        return
    if workload in ("async", "ssp"):
        _sim_server(topo, workload, Path(out), seed, t0, opts)
        return
    if workload == "gossip":
        _sim_gossip(topo, Path(out), seed, t0, opts)
        return
    if workload == "streaming-diloco":
        explicit = ctx.get_parameter_source("codec") is not click.core.ParameterSource.DEFAULT
        _sim_streaming(topo, Path(out), seed, t0, opts, codec=opts["codec"] if explicit else "int4")
        return
    from edgeray.sim.calibrate import load_calibration
    from edgeray.sim.engine import RoundConfig, simulate
    from edgeray.sim.report import LOSS_NOTE, write_run

    calibration = load_calibration(opts["calibration"]) if opts["calibration"] else None
    config = RoundConfig(
        params=opts["params"], compute_s=opts["compute_s"], rounds=opts["rounds"], codec=opts["codec"],
        jitter=not opts["no_jitter"], churn=not opts["no_churn"], transient=opts["transient"], seed=seed,
        local_steps=opts["local_steps"] if workload == "diloco" else 1,
        allreduce="ring" if workload == "sync" else "hierarchical",
        overhead_s=calibration.overhead_s if calibration else 0.0,
        goodput=calibration.goodput if calibration else 1.0,
    ).check()  # fmt: skip
    console.print(
        f"{topo.name}: {len(topo.nodes)} nodes, {len(topo.regions)} regions; {workload}, {config.rounds} rounds"
        + (f" of {config.local_steps} local steps" if config.local_steps > 1 else "")
    )
    summary = write_run(simulate(topo, config), Path(out))
    phases = summary["phase_s_median"]
    console.print(
        f"modelled {summary['modelled_s']:.1f} s (round median {summary['round_s_median']:.2f} s: "
        + ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in phases.items())
        + f"); intra-region {summary['intra_region_bytes'] / 2**20:.0f} MiB, inter-region "
        f"{summary['inter_region_bytes'] / 2**20:.0f} MiB; energy {summary['energy_j'] / 3.6e6:.2f} kWh; "
        f"fewest live {summary['live_min']}"
    )
    console.print(f"{LOSS_NOTE}. Wrote {out}/ in {time.perf_counter() - t0:.1f} s")


def _sim_server(topo: Topology, workload: str, out: Any, seed: int, t0: float, o: dict[str, Any]) -> None:
    from edgeray.sim.report import LOSS_NOTE
    from edgeray.sim.server import ServerConfig, simulate_server, write_server_run

    config = ServerConfig(
        params=o["params"], compute_s=o["compute_s"], rounds=o["rounds"],
        bound=o["bound"] if workload == "ssp" else None, staleness=o["staleness"],
        jitter=not o["no_jitter"], transient=o["transient"], churn=not o["no_churn"], seed=seed,
    ).check()  # fmt: skip
    console.print(
        f"{topo.name}: {len(topo.nodes)} nodes, {len(topo.regions)} regions; {workload}, "
        f"{config.rounds * len(topo.nodes):,} updates"
    )
    s = write_server_run(simulate_server(topo, config), out)
    console.print(
        f"modelled {s['modelled_s']:.1f} s, {s['updates_per_s']:.1f} updates/s, server on {s['server']}; "
        f"staleness mean {s['staleness_mean']:.1f}, p95 {s['staleness_p95']:.0f}, max {s['staleness_max']}; "
        f"dropped {s['dropped']}, ssp waits {s['ssp_waits']}, {s['lost_steps']} steps lost to failures; "
        f"inter-region {s['inter_region_bytes'] / 2**20:.0f} MiB"
    )
    console.print(f"{LOSS_NOTE}. Wrote {out}/ in {time.perf_counter() - t0:.1f} s")


def _sim_gossip(topo: Topology, out: Any, seed: int, t0: float, o: dict[str, Any]) -> None:
    from edgeray.sim.gossip import GossipConfig, simulate_gossip, write_gossip_run
    from edgeray.sim.report import LOSS_NOTE

    config = GossipConfig(
        params=o["params"], compute_s=o["compute_s"], rounds=o["rounds"], jitter=not o["no_jitter"],
        transient=o["transient"], churn=not o["no_churn"], seed=seed,
    ).check()  # fmt: skip
    console.print(
        f"{topo.name}: {len(topo.nodes)} nodes, {len(topo.regions)} regions; gossip, "
        f"{config.rounds * len(topo.nodes):,} local steps"
    )
    s = write_gossip_run(simulate_gossip(topo, config), out)
    console.print(
        f"modelled {s['modelled_s']:.1f} s, {s['steps_per_s']:.1f} steps/s, steps per worker "
        f"{s['steps_min']}-{s['steps_max']}, exchange {s['exchange_s_mean']:.2f} s on average; "
        f"{s['lost_steps']} steps lost to failures; inter-region {s['inter_region_bytes'] / 2**20:.0f} MiB"
    )
    console.print(f"{LOSS_NOTE}. Wrote {out}/ in {time.perf_counter() - t0:.1f} s")


def _sim_streaming(topo: Topology, out: Any, seed: int, t0: float, o: dict[str, Any], *, codec: str) -> None:
    from edgeray.sim.calibrate import load_calibration
    from edgeray.sim.report import LOSS_NOTE, write_run
    from edgeray.sim.streaming import StreamingConfig, simulate_streaming

    calibration = load_calibration(o["calibration"]) if o["calibration"] else None
    config = StreamingConfig(
        params=o["params"], compute_s=o["compute_s"], rounds=o["rounds"], h=o["local_steps"],
        fragments=o["fragments"], overlap=o["overlap"], codec=codec, jitter=not o["no_jitter"],
        transient=o["transient"], churn=not o["no_churn"], seed=seed,
        overhead_s=calibration.overhead_s if calibration else 0.0,
        goodput=calibration.goodput if calibration else 1.0,
    ).check()  # fmt: skip
    console.print(
        f"{topo.name}: {len(topo.nodes)} nodes, {len(topo.regions)} regions; streaming-diloco, {config.rounds} "
        f"rounds of {config.h} inner steps, {config.fragments} fragments, overlap {config.overlap}"
    )
    summary = write_run(simulate_streaming(topo, config), out)
    console.print(
        f"modelled {summary['modelled_s']:.1f} s ({summary['modelled_s'] / summary['steps']:.2f} s per step, "
        f"{summary['exposed_s']:.1f} s of it waiting for merges); inter-region "
        f"{summary['inter_region_bytes'] / 2**20:.0f} MiB, peak per outer step "
        f"{summary['peak_outer_inter_region_bytes'] / 2**20:.1f} MiB"
    )
    console.print(f"{LOSS_NOTE}. Wrote {out}/ in {time.perf_counter() - t0:.1f} s")


def _sim_serving(topo: Topology, out: Any, seed: int, t0: float, **o: Any) -> None:
    from edgeray.sim.serving import (
        SERVICE_NOTE,
        ServiceModel,
        ServingConfig,
        read_trace,
        simulate_serving,
        write_serving,
    )

    config = ServingConfig(
        requests=o["requests"], rate_per_s=o["rate"], capacity=o["capacity"],
        nodes_per_replica=o["nodes_per_replica"], budget_ms=o["budget_ms"], tokens=o["tokens"], seed=seed,
    ).check(topo)  # fmt: skip
    service = ServiceModel.from_bench(o["service"]) if o["service"] else ServiceModel()
    arrivals = read_trace(o["trace"], topo) if o["trace"] else None
    n = len(arrivals[0]) if arrivals else config.requests
    console.print(
        f"{topo.name}: {len(topo.nodes)} nodes, {len(topo.regions)} regions; serving, {n:,} requests "
        + (f"from {o['trace']}" if arrivals else f"at {config.rate_per_s:g}/s")
    )

    def progress(done: int, total: int) -> None:
        console.print(f"  {done:,}/{total:,} requests ({time.perf_counter() - t0:.0f} s)")

    result = simulate_serving(topo, config, service, arrivals=arrivals, progress=progress)
    summary = write_serving(result, out)
    p50, p95 = summary["ttft_p50_ms"] or float("nan"), summary["ttft_p95_ms"] or float("nan")
    console.print(
        f"TTFT p50 {p50:.1f} ms, p95 {p95:.1f} ms; in region "
        f"{summary['in_region']:.1%}, spilled {summary['spilled']:.1%}, rejected {summary['rejected']:.1%}"
    )
    console.print(f"{SERVICE_NOTE}. Wrote {out}/ in {time.perf_counter() - t0:.1f} s")


@main.group()
def audit() -> None:
    """The audit logs federated runs write beside their results (audit.jsonl, audit.head)."""


@audit.command(name="verify")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=True, dir_okay=True))
@_friendly
def audit_verify(run_dir: str) -> None:
    """Check RUN_DIR's audit log: every entry's hash, the chain, the order and the head. Names each entry that
    was edited, removed or reordered; exit status 1 if any."""
    from edgeray.federated.audit import LOG_NAME, read_entries, verify

    problems = verify(run_dir)
    if problems:
        for p in problems:
            err_console.print(f"[bold red]tampered:[/] {p}", markup=True)
        sys.exit(1)
    path = Path(run_dir)
    entries = read_entries(path / LOG_NAME if path.is_dir() else path)
    last = entries[-1] if entries else {"seq": None, "hash": ""}
    console.print(f"intact: {len(entries)} entries, head seq {last['seq']} hash {last['hash']}")


@main.command(name="list")
@_friendly
def list_() -> None:
    """List recorded clusters and topology presets."""
    for cname in cl.list_clusters():
        state = cl.load_state(cname)
        alive = "up" if cl.is_alive(state) else "stale"
        console.print(f"{cname}\t{alive}\t{state.address}\t{state.topology_path or state.topology_name}")
    console.print("presets: " + ", ".join(preset_names()))


@main.command()
@click.argument("file", required=False)
@click.option("--name", default=None, help="cluster name (default: demo-<topology>)")
@click.option("--timeout-s", type=float, default=600.0, show_default=True)
@click.option(
    "--train-steps",
    type=click.IntRange(0, 100_000),
    default=40,
    show_default=True,
    help="steps of pipeline-parallel training after placement (0: placement only)",
)
@click.option(
    "--serve/--no-serve",
    "serve_",
    default=True,
    show_default=True,
    help="end by serving the trained model in every region and asking from each",
)
@click.option("--engine", type=click.Choice(["auto", "vllm", "torch"]), default="auto", show_default=True)
@click.option(
    "--monitor/--no-monitor",
    default=None,
    help="run Prometheus with edgeray's dashboards' queries and alert rules during the demo, send 30 s of "
    "traffic, and check that every panel has data (default: when Prometheus is installed)",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="also write what happened (placement, training summary, served answers) to this JSON file",
)
@_friendly
def demo(
    file: str | None,
    name: str | None,
    timeout_s: float,
    train_steps: int,
    serve_: bool,
    engine: str,
    monitor: bool | None,
    json_path: str | None,
) -> None:
    """Up a cluster, submit the main job (placement, pipeline training, regional serving) through the Ray
    job API, show the result, tear down. The run directory lands in ./runs/<name>."""
    import shutil

    from ray.job_submission import JobStatus, JobSubmissionClient

    from edgeray.monitoring import monitor as mon

    topo = _topology(file)
    if monitor is None:
        monitor = shutil.which("prometheus") is not None
        if not monitor:
            console.print(f"      (no monitoring: {mon.PROMETHEUS_HINT})")
    cname = name or f"demo-{topo.name}"
    t0 = time.monotonic()
    console.print(
        f"[bold]1/3[/] starting {topo.name!r}: {len(topo.nodes)} raylets in {len(topo.regions)} regions"
    )
    state = cl.up(topo, name=cname, progress=lambda msg: console.print(f"      {msg}"))
    try:
        console.print(f"      up in {time.monotonic() - t0:.1f} s at {state.address}")
        cl.use_cluster(state)  # the job client authenticates with this cluster's token
        client = JobSubmissionClient(state.dashboard_url)
        out = os.path.abspath(os.path.join("runs", cname))
        watch = None
        if monitor:
            watch = mon.start(
                cname, out=Path(out) / "monitor", progress=lambda m: console.print(f"      {m}")
            )
        entry = (
            f"{shlex.quote(sys.executable)} -m edgeray.demo --topology {shlex.quote(str(topo.path))} "
            f"--train-steps {train_steps} --out {shlex.quote(out)}"
        )
        if serve_ and train_steps > 0:
            entry += f" --serve-port {state.serve_port} --engine {engine}"
            if watch is not None:  # traffic for the serving panels, and time for a last scrape
                entry += f" --traffic-s 30 --linger-s {3 * mon.SCRAPE_S}"
        if json_path:
            entry += f" --json {shlex.quote(os.path.abspath(json_path))}"
        job = client.submit_job(entrypoint=entry)
        console.print(f"[bold]2/3[/] submitted job {job}: {entry}")
        deadline, last, shown = time.monotonic() + timeout_s, None, 0
        while True:  # stream the job's output as it grows, bounded by timeout_s
            st = client.get_job_status(job)
            if st != last:
                console.print(f"      job {st.value.lower()} ({time.monotonic() - t0:.0f} s)")
                last = st
            logs = client.get_job_logs(job)
            if len(logs) > shown:
                click.echo(logs[shown:], nl=False)
                shown = len(logs)
            if st in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            if time.monotonic() > deadline:
                client.stop_job(job)
                raise cl.ClusterError(f"job {job} did not finish within {timeout_s:.0f} s (logs above)")
            time.sleep(1.0)
        if st != JobStatus.SUCCEEDED:
            raise cl.ClusterError(f"job {job} ended {st.value}")
        if watch is not None:
            time.sleep(2 * mon.SCRAPE_S)  # the last values reach Prometheus
            now = time.time()
            rows = mon.check(watch.prometheus_url, watch.started_at, now)
            console.print("[bold]panels[/] (every dashboard panel's query, run against Prometheus):")
            _print_check(rows, os.path.join(watch.dir, "panels.json"))
            pngs = mon.render(watch.prometheus_url, watch.started_at, now, Path(watch.dir) / "dashboards")
            console.print(f"      dashboards drawn from Prometheus's data: {', '.join(map(str, pngs))}")
            console.print(f"      Prometheus data kept in {watch.dir}/data")
    finally:
        # Tear down before printing: output can fail (a closed pipe) and must not leak the cluster.
        stopped = cl.down(cname)
        console.print(
            f"[bold]3/3[/] tore down {cname}: stopped {len(stopped)} processes; "
            f"total {time.monotonic() - t0:.1f} s"
        )


if __name__ == "__main__":
    main()

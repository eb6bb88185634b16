"""Packet-level WAN emulation against its spec and against the fabric's in-process model.

    python jobs/bench_wan.py --topology local --out results/wan [--quick] [--engine vllm|torch]
    python jobs/bench_wan.py --only serving      # one part again (links, fabric, serving), into OUT/summary.json
    python jobs/bench_wan.py --report            # the targets and plot again from OUT/summary.json

Needs root, /dev/net/tun and iproute2 (what `edgeray up --wan` needs). On this machine, in one run:

1. start-up: `edgeray up` plain and `--wan` of the topology, one after the other (seconds each);
2. links: on the `--wan` cluster, for one node pair per route shape (intra-region per region, and one pair
   per inter-region hop count) the UDP round trip (median of 50, 64-byte datagrams) less the endpoints'
   floor (the same echo over the sender's loopback) against twice the route's one-way latency, and a bulk TCP transfer's goodput (after its first quarter, past slow start)
   against the route's rate; with the router's CPU seconds per transferred GB;
3. fabric: the fabric's collectives (jobs/bench_fabric.py's: a topology-unaware ring, a region-ordered
   ring, hierarchical, gossip) on the `--wan` cluster, where the fabric adds no delay of its own and the
   packets pay the links: each op's packet-level measured time (median of --repeats runs after a warm
   one) beside the in-process modelled time of the same runs (the latest worker's modelled clock, gloo's
   ready notices included; the ledger's critical path is kept beside it). The modelled time has no
   compute in it, so the target compares it with the measured time less the software floor: the same op
   on the plain loopback cluster with no emulation (time_scale 0), what the processes, torch and gloo cost
   on this machine's cores with an infinitely fast network. The raw ratio is reported too, and so is the
   network's part less the emulator's floor: the same ops on a second `--wan` cluster of the topology with
   every link at zero latency, jitter and loss and the highest rate (:func:`null_links`), where the router
   still carries every packet through the TUN devices on these two cores but no link holds one back; each
   op's router CPU seconds are recorded on both `--wan` clusters. The hierarchical all-reduce of the tiny
   model's parameters is the DiLoCo outer step;
4. serving: the regional app (`serve run edgeray.serve:app`, one ingress per region on `--wan`); for each
   caller region, a client in a node of that region (not the ingress's) streams completions through its
   region's ingress, first served in its own region, then spilled: the engines of the regions the router
   would try first are stopped (SIGSTOP, as a hung region) until the ingress sees them unhealthy. Each
   spill's extra time to first token (client-measured medians) beside the topology's extra round trip
   between the ingress's node and the two replicas' nodes.

Writes OUT/summary.json and OUT/wan.png and prints the tables. What the router cannot do is stated beside
its figures: it is one Python process, so a link faster than it forwards is measured at its ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fabric import MB, run_op, size_label, start_workers

from edgeray import cluster
from edgeray.atomic import write_atomic
from edgeray.fabric.collectives import GroupPlan
from edgeray.fabric.groups import RunGroups
from edgeray.topology import LinkClass, Topology, load_topology, resolve_topology_path
from edgeray.wan import netns

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 9999)); print("ready", flush=True)
while True:
    d, a = s.recvfrom(65535); s.sendto(d, a)
"""
PING = """
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); out = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); s.sendto(b"x" * 64, (sys.argv[1], 9999))
    try:
        s.recvfrom(100); out.append((time.perf_counter() - t) * 1e3)
    except socket.timeout:
        pass
    time.sleep(0.01)
print(json.dumps(out))
"""
SINK = """
import json, socket, sys, time
total = int(sys.argv[2]); quarter = total // 4
s = socket.create_server((sys.argv[1], 9998)); print("ready", flush=True)
c, _ = s.accept(); n = 0; t1 = None
while (d := c.recv(1 << 18)):
    n += len(d)
    if t1 is None and n >= quarter:
        t1, n1 = time.perf_counter(), n
t2 = time.perf_counter()
print(json.dumps({"bytes": n, "mbps": (n - n1) * 8 / max(t2 - t1, 1e-9) / 1e6}), flush=True)
"""
STREAM = """
import json, sys, time, requests
base, n = sys.argv[1], int(sys.argv[2]); out = []
with requests.Session() as s:
    for i in range(n + 2):  # the first two open the connection and warm the path: not counted
        t = time.perf_counter(); ttft = None; meta = {}
        body = {"model": "edgeray-tiny", "prompt": "The forest", "max_tokens": 4, "stream": True, "temperature": 0}
        with s.post(base + "/v1/completions", json=body, stream=True, timeout=60) as r:
            for line in r.iter_lines():
                if ttft is None and line.startswith(b"data: "):
                    ttft = (time.perf_counter() - t) * 1e3
                if line.startswith(b": edgeray "):
                    meta = json.loads(line[10:])
        if i >= 2 and r.status_code == 200:
            out.append({"ttft_ms": ttft, **{k: meta.get(k) for k in
                        ("region", "node", "network_in_ms", "network_out_ms", "network_clock", "ttft_ms",
                         "caller_rtt_ms", "path_rtt_ms")}})
            out[-1]["engine_ttft_ms"] = out[-1].pop("ttft_ms")
            out[-1]["ttft_ms"] = ttft
        time.sleep(0.02)
print(json.dumps(out))
"""
SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], 9998), timeout=120)
c.sendall(b"x" * int(sys.argv[2])); c.close()
"""


def _in(wan: netns.WanState, node: str, code: str, *args: str) -> list[str]:
    return netns.run_in(wan, node, [sys.executable, "-c", textwrap.dedent(code), *args])


def route_pairs(topo: Topology) -> list[tuple[str, str, str]]:
    """(label, src, dst): each region's first two nodes, and one pair per inter-region hop count."""
    pairs: list[tuple[str, str, str]] = []
    for region in topo.regions.values():
        if len(region.nodes) >= 2:
            pairs.append(
                (f"intra {region.name} ({region.tier.value})", region.nodes[0].name, region.nodes[1].name)
            )
    by_hops: dict[int, tuple[str, str]] = {}
    for a in topo.nodes:
        for b in topo.nodes:
            route = topo.route(a, b)
            if route.link_class is LinkClass.INTER_REGION:
                by_hops.setdefault(len(route.regions) - 1, (a, b))
    for hops, (a, b) in sorted(by_hops.items()):
        pairs.append((f"inter {hops} hop{'s' if hops > 1 else ''} ({topo.route(a, b).regions[0]}->"
                      f"{topo.route(a, b).regions[-1]})", a, b))  # fmt: skip
    return pairs


def links(topo: Topology, wan: netns.WanState, bulk_mb: int) -> list[dict[str, Any]]:
    rows = []
    for label, a, b in route_pairs(topo):
        link = topo.link(a, b)
        # The endpoints' own floor: the same echo over the source namespace's loopback (two Python
        # processes and the kernel, no router, no link); what remains above it is the emulated network.
        echo = subprocess.Popen(_in(wan, a, ECHO, "127.0.0.1"), stdout=subprocess.PIPE, text=True)
        try:
            assert echo.stdout is not None and echo.stdout.readline().startswith("ready")
            out = subprocess.run(_in(wan, a, PING, "127.0.0.1", "50"), capture_output=True, text=True,
                                 timeout=120, check=True)  # fmt: skip
            floor = statistics.median(json.loads(out.stdout))
        finally:
            echo.kill()
            echo.wait()
        echo = subprocess.Popen(_in(wan, b, ECHO, wan.addresses[b]), stdout=subprocess.PIPE, text=True)
        try:
            assert echo.stdout is not None and echo.stdout.readline().startswith("ready")
            out = subprocess.run(_in(wan, a, PING, wan.addresses[b], "50"), capture_output=True, text=True,
                                 timeout=120, check=True)  # fmt: skip
            rtts = json.loads(out.stdout)
        finally:
            echo.kill()
            echo.wait()
        total = bulk_mb * MB
        cpu0 = netns.router_stats(wan).get("cpu_s", 0.0)
        sink = subprocess.Popen(
            _in(wan, b, SINK, wan.addresses[b], str(total)), stdout=subprocess.PIPE, text=True
        )
        try:
            assert sink.stdout is not None and sink.stdout.readline().startswith("ready")
            t0 = time.perf_counter()
            subprocess.run(_in(wan, a, SOURCE, wan.addresses[b], str(total)), timeout=600, check=True)
            bulk = json.loads(sink.stdout.readline())
            wall = time.perf_counter() - t0
        finally:
            sink.kill()
            sink.wait()
        time.sleep(1.2)  # the router rewrites its stats every second
        cpu1 = netns.router_stats(wan).get("cpu_s", 0.0)
        row = {
            "link": label,
            "src": a,
            "dst": b,
            "spec_rtt_ms": 2 * link.latency_ms,
            "rtt_ms": statistics.median(rtts),
            "rtt_min_ms": min(rtts),
            "rtt_floor_ms": floor,
            "network_rtt_ms": statistics.median(rtts) - floor,
            "rtt_replies": len(rtts),
            "spec_mbps": link.bandwidth_mbps,
            "goodput_mbps": bulk["mbps"],
            "bulk_bytes": bulk["bytes"],
            "bulk_wall_s": wall,
            "router_cpu_s_per_gb": (cpu1 - cpu0) / (total / 1e9),
        }
        row["rtt_ratio"] = row["network_rtt_ms"] / row["spec_rtt_ms"]
        row["goodput_ratio"] = row["goodput_mbps"] / row["spec_mbps"]
        rows.append(row)
        print(f"  {label:34} RTT {row['rtt_ms']:7.2f} ms - floor {floor:.2f} (spec {row['spec_rtt_ms']:6.2f}, "
              f"x{row['rtt_ratio']:.2f})"
              f"  goodput {row['goodput_mbps']:8.1f} Mbit/s (spec {row['spec_mbps']:g}, x{row['goodput_ratio']:.2f})",
              flush=True)  # fmt: skip
    return rows


def null_links(topo: Topology) -> Topology:
    """``topo`` with every link (intra-region, inter-region, node ports) at zero latency, jitter and loss and
    the highest rate a topology accepts: on ``--wan`` the router still carries every packet through the TUN
    devices, but no link holds one back. What a collective takes there is the emulator's floor."""
    doc = topo.spec.model_dump(mode="json")
    null = {"latency_ms": 0.0, "jitter_ms": 0.0, "bandwidth_mbps": 1e7, "loss": 0.0}
    for region in doc["regions"]:
        region["intra_link"] = dict(null)
        for node in region["nodes"]:
            node["bandwidth_mbps"] = None
    for link in doc["links"]:
        link.update(null)
    doc["defaults"]["inter_link"] = dict(null)
    doc["defaults"]["intra_link"] = {}
    doc["name"] = f"{topo.name}-null"
    return Topology.from_dict(doc)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used; 0 where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fabric(
    topo: Topology, sizes_mb: list[float], *, time_scale: float, repeats: int, router_pid: int = 0
) -> list[dict[str, Any]]:
    """The fabric's collectives on the connected cluster, each warmed once then run ``repeats`` times:
    median modelled and measured seconds per (op, size). On the --wan cluster (``time_scale`` 1: the
    fabric adds nothing, the packets pay the links) measured is the packet level; on a loopback cluster with
    ``time_scale`` 0 it is the software floor (processes, torch, gloo on this machine's cores, no link).
    ``router_pid``: the WAN router, whose CPU seconds per run are recorded (``router_cpu_s``)."""
    import random

    from edgeray.model.presets import build_model  # the DiLoCo outer step all-reduces the model once

    rows: list[dict[str, Any]] = []
    nodes = list(topo.nodes)
    started: list[Any] = []
    with RunGroups("bench-wan") as groups:
        try:
            plan = GroupPlan.from_nodes(topo, nodes, prefix=groups.name("aware/"))
            order = nodes[:]
            random.Random(0).shuffle(order)
            unaware = GroupPlan.from_nodes(topo, order, prefix=groups.name("unaware/"), region_ordered=False)
            workers = start_workers(topo, plan, time_scale=time_scale)
            started += workers
            unaware_workers = start_workers(topo, unaware, time_scale=time_scale)
            started += unaware_workers
            diloco_mb = sum(p.numel() for p in build_model("tiny").parameters()) * 4 / MB
            cases = [
                (mb, name)
                for mb in sizes_mb
                for name in ("flat", "flat_region_ordered", "hierarchical", "gossip")
            ]
            cases.append((diloco_mb, "diloco_outer_step"))
            for mb, name in cases:
                ws = unaware_workers if name == "flat" else workers
                op = {"flat_region_ordered": "flat", "diloco_outer_step": "hierarchical"}.get(name, name)
                kwargs = {"rounds": 1} if op == "gossip" else {}
                numel = int(mb * MB) // 4
                run_op(ws, op, numel, **kwargs)  # warm: connections open, TCP past slow start
                cpu0 = cpu_s(router_pid) if router_pid else 0.0
                runs = [run_op(ws, op, numel, **kwargs)[0] for _ in range(repeats)]
                row = {"op": name, "size": size_label(mb), "mb": mb, **runs[-1]}
                if router_pid:
                    row["router_cpu_s"] = (cpu_s(router_pid) - cpu0) / repeats
                row["modelled_runs"] = [r["modelled_s"] for r in runs]
                row["measured_runs"] = [r["measured_s"] for r in runs]
                row["modelled_s"] = statistics.median(row["modelled_runs"])
                row["measured_s"] = statistics.median(row["measured_runs"])
                rows.append(row)
                print(f"  {name:20} {size_label(mb):>8}  modelled {row['modelled_s']:7.3f} s  measured "
                      f"{row['measured_s']:7.3f} s  (medians of {repeats})", flush=True)  # fmt: skip
        finally:
            for w in started:
                ray.kill(w, no_restart=True)
    return rows


def fabric_against_floor(
    wan_rows: list[dict[str, Any]],
    floor_rows: list[dict[str, Any]],
    emulator_rows: list[dict[str, Any]] | None = None,
) -> None:
    """Each packet-level row gets the same op's software floor and the ratios: raw measured / modelled and
    the network's part (measured less the floor) / modelled. With ``emulator_rows`` (the same ops on a
    ``--wan`` cluster whose links hold nothing back, :func:`null_links`) also the emulator's floor
    (``emulator_floor_s``: the software floor plus the router's and the TUN devices' own cost on these
    cores) and the network's part less that (``emulated_network_s``, ``emulated_over_modelled``)."""
    floor = {(r["op"], r["size"]): r["measured_s"] for r in floor_rows}
    emulator = {(r["op"], r["size"]): r for r in emulator_rows or []}
    for row in wan_rows:
        row["measured_over_modelled"] = row["measured_s"] / max(row["modelled_s"], 1e-9)
        key = (row["op"], row["size"])
        if key in floor:
            row["floor_s"] = floor[key]
            row["network_s"] = row["measured_s"] - row["floor_s"]
            row["network_over_modelled"] = row["network_s"] / max(row["modelled_s"], 1e-9)
        if key in emulator:
            row["emulator_floor_s"] = emulator[key]["measured_s"]
            row["emulator_router_cpu_s"] = emulator[key].get("router_cpu_s")
            row["emulated_network_s"] = row["measured_s"] - row["emulator_floor_s"]
            row["emulated_over_modelled"] = row["emulated_network_s"] / max(row["modelled_s"], 1e-9)


@contextlib.contextmanager
def connected(state: Any, namespace: str | None = None) -> Any:
    """This driver connected to ``state``'s cluster; its environment restored afterwards."""
    saved = dict(os.environ)
    cluster.use_cluster(state)
    ray.init(logging_level=logging.ERROR, log_to_driver=False, namespace=namespace)
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def _status(base: str) -> dict[str, Any]:
    import requests

    return dict(requests.get(f"{base}/edgeray/status", timeout=10).json())


def _wait_health(base: str, regions: set[str], healthy: bool, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reps = [r for r in _status(base)["replicas"] if r["region"] in regions]
        if reps and all(r["healthy"] is healthy for r in reps):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{base}: the replicas of {sorted(regions)} did not become healthy={healthy}")


def _signal_tree(pid: int, sig: int) -> None:
    import psutil

    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def _block(
    wan: netns.WanState, client: str, base: str, stop: list[str], pids: dict[str, tuple[int, str]], n: int
) -> list[dict[str, Any]]:
    """``n`` streamed requests from ``client``'s namespace to the ingress at ``base``, with the engines of
    the ``stop`` regions stopped (SIGSTOP) until the ingress sees them unhealthy, and resumed after."""
    import signal

    for region in stop:
        _signal_tree(pids[region][0], signal.SIGSTOP)
    try:
        if stop:
            _wait_health(base, set(stop), False)
        run = subprocess.run(_in(wan, client, STREAM, base, str(n)), capture_output=True, text=True,
                             timeout=300, check=True)  # fmt: skip
        return list(json.loads(run.stdout))
    finally:
        for region in stop:
            _signal_tree(pids[region][0], signal.SIGCONT)
        if stop:
            _wait_health(base, set(stop), True, 120)


def serving(
    topo: Topology, wan: netns.WanState, state: Any, engine: str, n: int, rounds: int = 3
) -> list[dict[str, Any]]:
    """Per caller region: time to first token through its own ingress, served in region and spilled (the
    regions tried first stopped in turn), against the topology's extra round trip."""
    from edgeray.serve.client import router_info
    from edgeray.serve.routing import Router

    env = {**os.environ, **state.env()}
    port = state.serve_port
    bin_dir = Path(sys.executable).parent
    out = subprocess.run([str(bin_dir / "serve"), "run", "edgeray.serve:app", f"engine={engine}", "auth=open",
                          f"port={port}", "--non-blocking"], env=env, capture_output=True, text=True,
                         timeout=600, check=False)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"serve run failed: {out.stderr[-2000:]}")
    try:
        head = f"http://{wan.addresses['head']}:{port}"
        ingress = {r: router_info(port, 300, region=r) for r in topo.regions}
        _wait_health(head, set(topo.regions), True, 600)
        order = Router(topo).candidates
        rows = []
        per_block = max(1, n // rounds)
        for caller, info in ingress.items():
            base, at = info["addresses"][0], info["node"]
            others = [nd.name for nd in topo.regions[caller].nodes if nd.name != at]
            client = others[0] if others else at
            _wait_health(base, set(topo.regions), True, 120)
            pids = {r["region"]: (r["pid"], r["node"]) for r in _status(base)["replicas"]}
            cands = order(caller)
            got: dict[int, list[dict[str, Any]]] = {k: [] for k in range(len(cands))}
            for _ in range(rounds):  # the cases interleaved, so that drift in the machine's load cancels
                for k in range(len(cands)):
                    got[k] += _block(wan, client, base, cands[:k], pids, per_block)
            baseline: dict[str, Any] | None = None
            for k, region in enumerate(cands):
                served = {g["region"] for g in got[k]}
                if served != {region}:
                    raise RuntimeError(
                        f"caller {caller}, {cands[:k]} stopped: served by {served}, not {region}"
                    )
                node = pids[region][1]
                case = got[k]

                def med(key: str, case: list[dict[str, Any]] = case) -> float:
                    return float(statistics.median(g[key] for g in case))

                row = {
                    "caller": caller, "client_node": client, "ingress_node": at, "served": region,
                    "replica_node": node, "n": len(case), "caller_tier": topo.regions[caller].tier.value,
                    "served_tier": topo.regions[region].tier.value, "ttft_ms": med("ttft_ms"),
                    "engine_ttft_ms": med("engine_ttft_ms"), "caller_rtt_ms": med("caller_rtt_ms"),
                    "caller_topology_rtt_ms": 2 * topo.path_latency_ms(client, at) if client != at else 0.0,
                    "measured_path_rtt_ms": med("path_rtt_ms"), "clock": case[0]["network_clock"],
                    "path_rtt_ms": 2 * topo.path_latency_ms(at, node) if at != node else 0.0,
                }  # fmt: skip
                if baseline is None:
                    baseline = row
                else:
                    row["extra_ms"] = row["ttft_ms"] - baseline["ttft_ms"]
                    row["topology_extra_ms"] = row["path_rtt_ms"] - baseline["path_rtt_ms"]
                    row["extra_ratio"] = row["extra_ms"] / row["topology_extra_ms"]
                rows.append(row)
                extra = f"  extra {row['extra_ms']:6.1f} ms vs topology {row['topology_extra_ms']:5.1f} " \
                        f"(x{row['extra_ratio']:.2f})" if "extra_ms" in row else ""  # fmt: skip
                print(f"  {caller:>7} caller on {client}, ingress on {at}, served in {region:>7} ({node}): TTFT "
                      f"{row['ttft_ms']:5.1f} ms, engine {row['engine_ttft_ms']:5.1f}; round trips: caller "
                      f"{row['caller_rtt_ms']:4.1f} (topology {row['caller_topology_rtt_ms']:4.1f}), path {row['measured_path_rtt_ms']:4.1f} (topology "
                      f"{row['path_rtt_ms']:4.1f}){extra}", flush=True)  # fmt: skip
        return rows
    finally:
        subprocess.run([str(bin_dir / "serve"), "shutdown", "-y"], env=env, capture_output=True, timeout=120,
                       check=False)  # fmt: skip


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    lk = summary.get("links", [])
    names = [r["link"] for r in lk]
    x = range(len(lk))
    axes[0].bar([i - 0.2 for i in x], [r["spec_rtt_ms"] for r in lk], 0.4, label="spec (2 x one way)")
    axes[0].bar([i + 0.2 for i in x], [r["network_rtt_ms"] for r in lk], 0.4, label="measured - floor")
    axes[0].set_title("round trip, ms")
    axes[1].bar([i - 0.2 for i in x], [r["spec_mbps"] for r in lk], 0.4, label="spec")
    axes[1].bar([i + 0.2 for i in x], [r["goodput_mbps"] for r in lk], 0.4, label="TCP goodput")
    axes[1].set_yscale("log")
    axes[1].set_title("rate, Mbit/s")
    for ax in axes[:2]:
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    fab = summary.get("fabric", [])
    if fab:
        net = [r.get("network_s", r["measured_s"]) for r in fab]
        axes[2].scatter([r["modelled_s"] for r in fab], [r["measured_s"] for r in fab], marker="x", s=14,
                        color="grey", label="measured")  # fmt: skip
        axes[2].scatter([r["modelled_s"] for r in fab], net, label="measured - floor")
        emu = [r for r in fab if "emulated_network_s" in r]
        if emu:
            axes[2].scatter([r["modelled_s"] for r in emu], [r["emulated_network_s"] for r in emu], marker="^",
                            s=14, label="measured - emulator's floor")  # fmt: skip
        for r, y in zip(fab, net, strict=True):
            axes[2].annotate(f"{r['op']} {r['size']}", (r["modelled_s"], y), fontsize=6)
        top = max(max(r["modelled_s"], r["measured_s"]) for r in fab) * 1.1
        axes[2].plot([0, top], [0, top], "k--", lw=0.8, label="equal")
        axes[2].plot([0, top], [0, 1.15 * top], "k:", lw=0.6, label="+-15%")
        axes[2].plot([0, top], [0, top / 1.15], "k:", lw=0.6)
        axes[2].set_xlabel("in-process modelled s")
        axes[2].set_ylabel("packet-level measured s")
        axes[2].set_title("fabric collectives")
        axes[2].legend(fontsize=7)
    sv = [r for r in summary.get("serving", []) if "extra_ms" in r]
    if sv:
        labels = [f"{r['caller']}->{r['served']}" for r in sv]
        xs = range(len(sv))
        axes[3].bar([i - 0.2 for i in xs], [r["topology_extra_ms"] for r in sv], 0.4, label="topology")
        axes[3].bar([i + 0.2 for i in xs], [r["extra_ms"] for r in sv], 0.4, label="measured TTFT")
        axes[3].set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=7)
        axes[3].set_title("spilled minus in-region TTFT, ms")
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against this summary's figures."""
    lk, fab, sv = summary.get("links", []), summary.get("fabric", []), summary.get("serving", [])
    spills = [r for r in sv if "extra_ms" in r]
    # the case: an edge caller (campus) served in its region vs spilled to the cloud; the spills to
    # nearer regions are reported beside it (their few ms of extra round trip are within the engine's noise)
    to_cloud = [r for r in spills if r["served_tier"] == "cloud" and r["caller_tier"] != "cloud"]
    return [
        {"target": "RTT (less the endpoints' floor) within 10% of 2x one-way spec, every link class",
         "met": bool(lk) and all(abs(r["rtt_ratio"] - 1) <= 0.10 for r in lk),
         "figures": ", ".join(f"{r['link']} x{r['rtt_ratio']:.2f}" for r in lk)},
        {"target": "goodput within 10% of the rate, every link class",
         "met": bool(lk) and all(abs(r["goodput_ratio"] - 1) <= 0.10 for r in lk),
         "figures": ", ".join(f"{r['link']} x{r['goodput_ratio']:.2f}" for r in lk)},
        {"target": "fabric: modelled within 15% of packet-level measured less the software floor, per op and size",
         "met": bool(fab) and all(abs(r.get("network_over_modelled", r["measured_over_modelled"]) - 1) <= 0.15
                                  for r in fab),
         "figures": ", ".join(f"{r['op']} {r['size']} x{r.get('network_over_modelled', r['measured_over_modelled']):.2f}"
                              for r in fab)},
        {"target": "(reported) fabric: measured less the emulator's floor (links that hold nothing back) / modelled",
         "met": None,
         "figures": ", ".join(f"{r['op']} {r['size']} x{r['emulated_over_modelled']:.2f}"
                              for r in fab if "emulated_over_modelled" in r)},
        {"target": "(reported) fabric: packet-level measured / modelled, the floor included",
         "met": None,
         "figures": ", ".join(f"{r['op']} {r['size']} x{r['measured_over_modelled']:.2f}" for r in fab)},
        {"target": "serving: edge caller spilled to cloud minus in-region TTFT within 15% of the extra round trip",
         "met": bool(to_cloud) and all(abs(r["extra_ratio"] - 1) <= 0.15 for r in to_cloud),
         "figures": ", ".join(f"{r['caller']}->{r['served']} {r['extra_ms']:.1f}/{r['topology_extra_ms']:.1f} ms "
                              f"(x{r['extra_ratio']:.2f})" for r in to_cloud)},
        {"target": "(reported) every other spill: measured / topology extra round trip",
         "met": None,
         "figures": ", ".join(f"{r['caller']}->{r['served']} {r['extra_ms']:.1f}/{r['topology_extra_ms']:.1f} ms"
                              for r in spills if r not in to_cloud)},
        {"target": "up --wan within 2x of plain up",
         "met": summary["up_wan_s"] <= 2 * summary["up_plain_s"],
         "figures": f"{summary['up_wan_s']:.1f} s vs {summary['up_plain_s']:.1f} s"},
    ]  # fmt: skip


def report(summary: dict[str, Any], out: Path) -> int:
    """Targets into the summary; writes OUT/summary.json and OUT/wan.png, prints the targets' table."""
    summary["targets"] = targets(summary)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    plot(summary, out / "wan.png")
    print(f"\n{'target':70} met   figures")
    for t in summary["targets"]:
        met = "" if t["met"] is None else "yes" if t["met"] else "NO"
        print(f"{t['target']:70} {met:4}  {t['figures']}")
    print(f"wrote {out / 'summary.json'} and {out / 'wan.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default=os.environ.get("EDGERAY_TOPOLOGY") or "local")
    parser.add_argument("--out", default="results/wan")
    parser.add_argument(
        "--quick", action="store_true", help="8 MB bulk transfers; collectives of 64 KB and 1 MB"
    )
    parser.add_argument("--engine", default="vllm", help="the serving engine (vllm, torch)")
    parser.add_argument("--requests", type=int, default=30, help="streamed requests per serving case")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per fabric collective (medians)")
    parser.add_argument("--only", choices=["links", "fabric", "serving"], action="append",
                        help="run only these parts (repeatable); default all")  # fmt: skip
    parser.add_argument("--report", action="store_true",
                        help="run nothing: the targets, table and plot again from OUT/summary.json")  # fmt: skip
    args = parser.parse_args(argv)
    topo = load_topology(resolve_topology_path(args.topology))
    out = Path(args.out)
    if args.report:
        summary = json.loads((out / "summary.json").read_text())
        for r in summary.get("serving", []):
            r.setdefault("caller_tier", topo.regions[r["caller"]].tier.value)
            r.setdefault("served_tier", topo.regions[r["served"]].tier.value)
        return report(summary, out)
    netns.check_privileges()
    parts = set(args.only or ["links", "fabric", "serving"])
    sizes = [1 / 16, 1] if args.quick else [1 / 16, 1, 4]
    name = f"bench-wan-{os.getpid()}"
    summary: dict[str, Any] = {"topology": topo.name}
    if args.only and (out / "summary.json").exists():  # a partial run updates the parts it ran
        earlier = json.loads((out / "summary.json").read_text())
        if earlier.get("topology") == topo.name:
            summary = earlier
    t0 = time.monotonic()
    plain = cluster.up(topo, name=name + "-plain")
    summary["up_plain_s"] = time.monotonic() - t0
    floor: list[dict[str, Any]] = []
    try:
        if "fabric" in parts:
            with connected(plain):
                print("fabric collectives on the loopback cluster, no emulation (the software floor):",
                      flush=True)  # fmt: skip
                floor = fabric(topo, sizes, time_scale=0.0, repeats=args.repeats)
    finally:
        cluster.down(name + "-plain")
    emulator: list[dict[str, Any]] = []
    if "fabric" in parts:
        null = cluster.up(null_links(topo), name=name + "-null", wan=True)
        try:
            with connected(null):
                print("fabric collectives on --wan with links that hold nothing back (the emulator's floor):",
                      flush=True)  # fmt: skip
                emulator = fabric(topo, sizes, time_scale=1.0, repeats=args.repeats,
                                  router_pid=int(null.wan["router_pid"]))  # type: ignore[index]  # fmt: skip
        finally:
            cluster.down(name + "-null")
    t0 = time.monotonic()
    state = cluster.up(topo, name=name, wan=True)
    summary["up_wan_s"] = time.monotonic() - t0
    print(f"up: plain {summary['up_plain_s']:.1f} s, --wan {summary['up_wan_s']:.1f} s "
          f"(x{summary['up_wan_s'] / summary['up_plain_s']:.2f})", flush=True)  # fmt: skip
    try:
        wan = netns.WanState(**state.wan)  # type: ignore[arg-type]
        summary["router_priority"] = wan.priority
        summary["mtu"] = wan.mtu
        if "links" in parts:
            print("links (UDP round trip; TCP goodput past slow start):", flush=True)
            summary["links"] = links(topo, wan, bulk_mb=8 if args.quick else 32)
        if "fabric" in parts:
            with connected(state):
                print("fabric collectives on --wan (the packets' time):", flush=True)
                rows = fabric(topo, sizes, time_scale=1.0, repeats=args.repeats, router_pid=wan.router_pid)
            fabric_against_floor(rows, floor, emulator)
            summary["fabric"] = rows
            for r in rows:
                print(f"  {r['op']:20} {r['size']:>8}  modelled {r['modelled_s']:7.3f} s  packet-level "
                      f"{r['measured_s']:7.3f} s (x{r['measured_over_modelled']:.2f})  less the floor "
                      f"{r['floor_s']:6.3f} s: x{r['network_over_modelled']:.2f}  less the emulator's floor "
                      f"{r['emulator_floor_s']:6.3f} s: x{r['emulated_over_modelled']:.2f}  router CPU "
                      f"{r['router_cpu_s']:.3f} s", flush=True)  # fmt: skip
        if "serving" in parts:
            with connected(state, namespace="serve"):
                print(f"serving ({args.engine}; a client in each caller region, through its region's ingress; "
                      "median time to first token):", flush=True)  # fmt: skip
                summary["serving"] = serving(topo, wan, state, args.engine, args.requests)
                summary["serving_engine"] = args.engine
        summary["router"] = {k: v for k, v in netns.router_stats(wan).items() if k != "paths"}
    finally:
        cluster.down(name)
    return report(summary, out)


if __name__ == "__main__":
    sys.exit(main())

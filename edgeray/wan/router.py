"""The WAN router: one process in the root namespace that carries every packet between a cluster's namespaces.

    python -m edgeray.wan.router PLAN.json      # started by edgeray.wan.netns.setup, not by hand

Each endpoint (the head, every topology node, and the host) has a TUN device whose file descriptor this
process holds: the endpoint's TUN lives in its namespace (the host's stays in the root namespace), so every
IPv4 packet an endpoint sends to another endpoint's address is read here, and written to the destination's
TUN once the link model says it has arrived. Nothing else is routed: a packet for any other address is
dropped and counted, and the namespaces have no other interface than ``lo``.

Per packet, from the plan's path for (source endpoint, destination endpoint):

- loss: dropped with probability 1 - (1 - loss)^(ceil(payload / 1448)), so the byte loss rate equals the
  fabric's per-MSS model (edgeray.fabric.links) whatever the MTU;
- rate: the packet is serialised through every resource of the path in turn (sender's port out, each
  inter-region link per direction, receiver's port in; the resources edgeray.fabric.links.LinkModel
  shares between flows), each a FIFO at its Mbit/s. A packet that would wait longer than the resource's
  queue (the path's bandwidth-delay product, at least 64 KiB) is dropped (tail drop) and counted;
- delay: then it is held for the path's one-way latency plus a seeded Normal(0, jitter) draw (clipped at
  zero), and never delivered before an earlier packet of the same path (no reordering). The router wakes
  ahead of a packet's instant by its own mean wake-up delay (a moving mean), so packets leave on time on
  average rather than a wake-up late.

The process raises itself to real-time priority where the kernel lets it (queued packets go out late when
both cores are busy otherwise), writes ``ready`` (JSON) once every TUN is up, and every second rewrites
``stats.json`` with its CPU time, how late packets left against their due instant (mean and worst), and
packets, bytes, losses and queue drops per path. SIGTERM ends it; the TUN devices
vanish with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import json
import math
import os
import random
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MSS_BYTES = 1448  # as edgeray.fabric.links
MIN_QUEUE_BYTES = 64 << 10


@dataclass
class Resource:
    """One FIFO link resource (a port or a directed inter-region link)."""

    mbps: float
    queue_bytes: int
    free_at: float = 0.0
    drops: int = 0


@dataclass
class Path_:
    """Everything the router needs for one (source, destination) endpoint pair."""

    latency_s: float
    jitter_s: float
    loss: float
    resources: list[Resource]
    last_due: float = 0.0
    packets: int = 0
    bytes: int = 0
    lost: int = 0
    queue_drops: int = 0
    delay_sum_s: float = 0.0


class Lateness:
    """How late packets left the router against their due instant, and its wake-up delay (how long after
    the instant it asked to wake it did), whose moving mean it schedules ahead by.

    Only a sleep the timer ended is a wake-up sample. Packets drained in a batch after a stall are late by
    the stall, not by a wake-up delay: counting them would make the router wake (and deliver) early."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.worst = 0.0
        self.wakeup_s = 0.0

    def add(self, late_s: float) -> None:
        self.count += 1
        self.total += late_s
        self.worst = max(self.worst, late_s)

    def woke(self, delay_s: float) -> None:
        self.wakeup_s += 0.05 * (min(delay_s, 2e-3) - self.wakeup_s)  # a stall is not the usual delay


def open_tun(name: str, mtu: int) -> int:
    """A TUN device named ``name`` (no packet-info header), non-blocking; its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def build(plan: dict[str, Any]) -> tuple[dict[bytes, int], dict[tuple[int, int], Path_], list[str]]:
    """Endpoint addresses -> index, and the path of every ordered endpoint pair, from the plan."""
    endpoints = plan["endpoints"]
    by_addr = {bytes(int(x) for x in e["address"].split(".")): i for i, e in enumerate(endpoints)}
    resources: dict[str, Resource] = {}
    for key, spec in plan["resources"].items():
        resources[key] = Resource(mbps=float(spec["mbps"]), queue_bytes=int(spec["queue_bytes"]))
    paths: dict[tuple[int, int], Path_] = {}
    for p in plan["paths"]:
        paths[(p["src"], p["dst"])] = Path_(
            latency_s=p["latency_ms"] / 1e3,
            jitter_s=p["jitter_ms"] / 1e3,
            loss=p["loss"],
            resources=[resources[k] for k in p["resources"]],
        )
    return by_addr, paths, [e["name"] for e in endpoints]


def realtime() -> str:
    """Raise this process to SCHED_RR where allowed; says what it got."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))
        return "SCHED_RR 10"
    except (PermissionError, OSError, AttributeError) as exc:
        return f"normal (real-time priority refused: {exc})"


def serve(plan: dict[str, Any], out_dir: Path) -> None:
    by_addr, paths, names = build(plan)
    mtu = int(plan.get("mtu", 1500))
    rng = random.Random(int(plan.get("seed", 0)))
    fds = [open_tun(e["tun"], mtu) for e in plan["endpoints"]]
    fd_index = {fd: i for i, fd in enumerate(fds)}
    priority = realtime()
    (out_dir / "ready").write_text(json.dumps({"pid": os.getpid(), "priority": priority}))

    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    heap: list[tuple[float, int, int, bytes, float]] = []
    seq = 0
    unroutable = 0
    other_proto = 0
    next_stats = time.monotonic() + 1.0
    started = time.monotonic()
    read_size = mtu + 64
    late = Lateness()
    while not stopping:
        now = time.monotonic()
        timeout = 0.5 if not heap else max(0.0, min(heap[0][0] - now, 0.5))
        timed = bool(heap) and 0 < timeout < 0.5  # asleep until a packet's instant
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            continue
        if timed and not readable:  # the timer woke it: how late is the wake-up delay
            late.woke(time.monotonic() - now - timeout)
        for fd in readable:
            src = fd_index[fd]
            for _ in range(256):  # bounded, so one busy endpoint cannot starve deliveries
                try:
                    pkt = os.read(fd, read_size)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if len(pkt) < 20 or pkt[0] >> 4 != 4:
                    other_proto += 1
                    continue
                dst = by_addr.get(pkt[16:20])
                path = paths.get((src, dst)) if dst is not None else None
                if path is None:
                    unroutable += 1
                    continue
                t = time.monotonic()
                size = len(pkt)
                path.packets += 1
                path.bytes += size
                if path.loss > 0:
                    segments = max(1, math.ceil((size - 40) / MSS_BYTES))
                    if rng.random() < 1.0 - (1.0 - path.loss) ** segments:
                        path.lost += 1
                        continue
                dropped = False
                depart = t
                for r in path.resources:
                    start = max(depart, r.free_at)
                    if (start - t) * r.mbps * 1e6 / 8 > r.queue_bytes:
                        r.drops += 1
                        dropped = True
                        break
                    depart = start + size * 8 / (r.mbps * 1e6)
                    r.free_at = depart
                if dropped:
                    path.queue_drops += 1
                    continue
                delay = path.latency_s
                if path.jitter_s > 0:
                    delay = max(0.0, delay + rng.gauss(0.0, path.jitter_s))
                due = max(depart + delay, path.last_due)
                path.last_due = due
                path.delay_sum_s += due - t
                seq += 1
                # Wake early by the router's own mean wake-up delay, so the packet leaves at ``due``.
                wake = max(t, due - late.wakeup_s)
                heapq.heappush(heap, (wake, seq, fds[dst], pkt, due))  # type: ignore[index]
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            wake, _, fd, pkt, due = heapq.heappop(heap)
            late.add(now - due)
            with contextlib.suppress(OSError):  # the namespace's interface is down (being stopped)
                os.write(fd, pkt)
        if now >= next_stats:
            next_stats = now + 1.0
            write_stats(out_dir, names, paths, started, priority, unroutable, other_proto, len(heap), late)
    write_stats(out_dir, names, paths, started, priority, unroutable, other_proto, len(heap), late)


def write_stats(
    out_dir: Path,
    names: list[str],
    paths: dict[tuple[int, int], Path_],
    started: float,
    priority: str,
    unroutable: int,
    other_proto: int,
    queued: int,
    late: Lateness,
) -> None:
    usage = os.times()
    doc = {
        "delivered_packets": late.count,
        "late_ms_mean": 1e3 * late.total / max(1, late.count),
        "late_ms_max": 1e3 * late.worst,
        "wakeup_ms": 1e3 * late.wakeup_s,
        "uptime_s": time.monotonic() - started,
        "cpu_s": usage.user + usage.system,
        "priority": priority,
        "queued_packets": queued,
        "unroutable_packets": unroutable,
        "non_ipv4_packets": other_proto,
        "paths": [
            {
                "src": names[s],
                "dst": names[d],
                "packets": p.packets,
                "bytes": p.bytes,
                "lost": p.lost,
                "queue_drops": p.queue_drops,
                "mean_delay_ms": 1e3 * p.delay_sum_s / max(1, p.packets - p.lost - p.queue_drops),
            }
            for (s, d), p in sorted(paths.items())
            if p.packets
        ],
    }
    tmp = out_dir / "stats.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out_dir / "stats.json")


def main() -> None:
    plan_path = Path(sys.argv[1])
    plan = json.loads(plan_path.read_text())
    serve(plan, plan_path.parent)


if __name__ == "__main__":
    main()

"""Energy-aware serving: joules and dollars per request when the router prefers latency vs energy, and
what each tier costs per request.

    python jobs/bench_energy_routing.py --out results/energy-routing [--topology metro-5g] [--quick]

In one run, on the given fleet (default the metro-5g preset: phones, cell sites, a MEC hub, a cloud), the
regional app (torch engine, one replica per region) is deployed three times, ``prefer: latency``,
``prefer: energy`` (at most ``energy_slack_ms`` = 5 ms of expected time given up) and ``prefer: energy``
with ``energy_slack_ms: None`` (anything within the budget); each time the same requests (``--requests``, callers spread evenly over the regions,
``--budget-ms`` first-token budget, 16 greedy tokens, ``--concurrency`` at once) are sent. Per request:
the region that answered, the router's ``x-edgeray-energy-j`` (edgeray.energy.request_joules) and the
caller's time to the answer, modelled network both ways plus the measured engine time. Then, per region,
``--per-tier`` requests served in that region (a budget nothing breaks) price a request on each tier: joules,
and dollars (node-hour share + energy + egress of the answer's bytes), the seed's "edge inference 3-5x
cheaper per request than the cloud" checked against this model.
Writes DIR/summary.json, DIR/energy_routing.png and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from edgeray import cluster
from edgeray.atomic import write_atomic
from edgeray.energy import BYTES_PER_GB, J_PER_KWH
from edgeray.topology import Topology, load_topology, resolve_topology_path

PROMPT = "The for statement"
MODES: dict[str, dict[str, Any]] = {
    "latency": {"prefer": "latency"},
    "energy": {"prefer": "energy"},  # the default slack: at most 5 ms of expected time given up
    "energy-any": {"prefer": "energy", "energy_slack_ms": None},  # anything within the budget
}


async def send(
    base: str, key: str, callers: list[str], budget_ms: float, concurrency: int, tokens: int
) -> list[dict[str, Any]]:
    """One non-streaming completion per caller entry, ``concurrency`` at once; what each answer says."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    out: list[dict[str, Any]] = []

    async def one(session: aiohttp.ClientSession, caller: str) -> None:
        headers = {
            "Authorization": f"Bearer {key}",
            "x-edgeray-region": caller,
            "x-edgeray-budget-ms": str(budget_ms),
        }
        body = {"model": "edgeray-tiny", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
        async with sem, session.post(f"{base}/v1/completions", json=body, headers=headers) as r:
            data = await r.read()
            h = r.headers
            row: dict[str, Any] = {"caller": caller, "status": r.status, "bytes": len(data)}
            if r.status == 200:
                engine = float(h["x-edgeray-ttft-ms"])
                network = float(h["x-edgeray-network-in-ms"]) + float(h["x-edgeray-network-out-ms"])
                row |= {
                    "region": h["x-edgeray-region"],
                    "node": h["x-edgeray-node"],
                    "energy_j": float(h["x-edgeray-energy-j"]),
                    "engine_ms": engine,
                    "answer_ms": engine + network,
                }
            out.append(row)

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session, c) for c in callers))
    return out


def p95(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(0.95 * len(s)))] if s else float("nan")


def digest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == 200]
    served: dict[str, int] = {}
    for r in ok:
        served[r["region"]] = served.get(r["region"], 0) + 1
    return {
        "requests": len(rows),
        "answered": len(ok),
        "statuses": {
            str(s): sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})
        },
        "served_by_region": served,
        "mean_energy_j": statistics.fmean(r["energy_j"] for r in ok) if ok else float("nan"),
        "p50_answer_ms": statistics.median(r["answer_ms"] for r in ok) if ok else float("nan"),
        "p95_answer_ms": p95([r["answer_ms"] for r in ok]),
        "p95_engine_ms": p95([r["engine_ms"] for r in ok]),
    }


def price(topology: Topology, rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per region: mean joules and dollars per request (its node's hour share for the engine time, the
    energy at the region's price, the answer's bytes at its egress price when it left the caller's region)."""
    out: dict[str, dict[str, float]] = {}
    for region in topology.regions:
        mine = [r for r in rows if r.get("region") == region]
        if not mine:
            continue
        cost = topology.regions[region].cost
        usd = [
            cost.node_hour_usd * r["engine_ms"] / 3.6e6
            + cost.energy_usd_per_kwh * r["energy_j"] / J_PER_KWH
            + (cost.egress_usd_per_gb * r["bytes"] / BYTES_PER_GB if r["caller"] != region else 0.0)
            for r in mine
        ]
        out[region] = {
            "tier": topology.regions[region].tier.value,
            "requests": len(mine),
            "mean_energy_j": statistics.fmean(r["energy_j"] for r in mine),
            "mean_usd": statistics.fmean(usd),
            "p50_engine_ms": statistics.median(r["engine_ms"] for r in mine),
        }
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    modes = list(MODES)
    a.bar(modes, [summary[m]["mean_energy_j"] for m in modes], color=["tab:blue", "tab:green", "tab:olive"])
    a.set_ylabel("mean J per request")
    ax2 = a.twinx()
    ax2.plot(modes, [summary[m]["p95_answer_ms"] for m in modes], "ko-")
    ax2.set_ylabel("p95 time to the answer, ms (black)")
    a.set_title("router preference")
    tiers = summary["per_region"]
    names = list(tiers)
    b.bar(names, [tiers[n]["mean_usd"] * 1e6 for n in names], color="tab:orange")
    b.set_ylabel("micro-dollars per request")
    b.set_title("a request served in each region")
    b.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="metro-5g")
    p.add_argument("--out", default="results/energy-routing")
    p.add_argument("--requests", type=int, default=120, help="requests per preference")
    p.add_argument("--per-tier", type=int, default=12, help="requests served in each region for prices")
    p.add_argument("--budget-ms", type=float, default=250.0)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="36 requests per preference, 4 per region")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.per_tier = 36, 4
    from ray import serve

    from edgeray.serve.app import app
    from edgeray.serve.client import router_address, wait_until_serving

    topo = load_topology(resolve_topology_path(args.topology))
    regions = list(topo.regions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(16)
    os.environ["EDGERAY_API_KEYS"] = key
    callers = [regions[i % len(regions)] for i in range(args.requests)]
    summary: dict[str, Any] = {"topology": topo.name, "budget_ms": args.budget_ms, "tokens": args.tokens,
                               "concurrency": args.concurrency}  # fmt: skip
    with cluster.driver(topo, name=f"bench-energy-{os.getpid()}") as state:
        port = state.serve_port if state is not None else int(os.environ.get("EDGERAY_SERVE_PORT", "8000"))
        serve.start(proxy_location="Disabled")
        for prefer, extra in MODES.items():
            config = {"topology": str(topo.path), "engine": "torch", "port": port,
                      "default_scaling": {"min_replicas": 1, "max_replicas": 1}, "max_model_len": 128,
                      **extra}  # fmt: skip
            serve.run(app(config), name=f"energy-{prefer}", route_prefix="/", blocking=False)
            try:
                print(f"{prefer} ({extra}): starting one torch replica per region ...", flush=True)
                base = router_address(port)
                wait_until_serving(base, key, regions, timeout_s=420)
                asyncio.run(send(base, key, regions * 2, 60_000, 1, args.tokens))  # warm every engine
                time.sleep(11)  # the router's latency window forgets the warm-up
                rows = asyncio.run(send(base, key, callers, args.budget_ms, args.concurrency, args.tokens))
                summary[prefer] = digest(rows)
                summary[f"{prefer}_rows"] = rows
                if prefer == "latency":  # prices: each region answering its own callers
                    own = [r for r in regions for _ in range(args.per_tier)]
                    priced = asyncio.run(send(base, key, own, 60_000, 1, args.tokens))
                    summary["per_region"] = price(topo, priced)
                d = summary[prefer]
                print(
                    f"  {prefer:8} {d['mean_energy_j']:.3f} J/request, p95 answer {d['p95_answer_ms']:.1f} ms, "
                    f"served by {d['served_by_region']}",
                    flush=True,
                )
            finally:
                serve.delete(f"energy-{prefer}")
                time.sleep(3)  # the router's port is free again before the next app listens on it
        serve.shutdown()
    lat, eng, anyway = summary["latency"], summary["energy"], summary["energy-any"]
    fewer = 1 - eng["mean_energy_j"] / lat["mean_energy_j"]
    slower = eng["p95_answer_ms"] / lat["p95_answer_ms"] - 1
    tiers = summary["per_region"]
    cloud = [v["mean_usd"] for v in tiers.values() if v["tier"] == "cloud"]
    edge = {n: v for n, v in tiers.items() if v["tier"] in ("micro", "regional")}
    ratios = {n: cloud[0] / v["mean_usd"] for n, v in edge.items() if v["mean_usd"] > 0} if cloud else {}
    summary["targets"] = [
        {"target": "prefer=energy: >= 20% fewer joules per request", "met": fewer >= 0.20,
         "figures": f"{fewer:.1%} fewer ({lat['mean_energy_j']:.3f} -> {eng['mean_energy_j']:.3f} J)"},
        {"target": "... at <= 5% higher p95 time to the answer", "met": slower <= 0.05,
         "figures": f"{slower:+.1%} ({lat['p95_answer_ms']:.1f} -> {eng['p95_answer_ms']:.1f} ms)"},
        {"target": "(for reference) energy_slack_ms=None: anything within the budget", "met": True,
         "figures": f"{1 - anyway['mean_energy_j'] / lat['mean_energy_j']:.1%} fewer joules, p95 answer "
                    f"{anyway['p95_answer_ms'] / lat['p95_answer_ms'] - 1:+.1%}"},
        {"target": "seed: edge inference 3-5x cheaper per request than the cloud (this model's prices)",
         "met": bool(ratios) and all(r >= 3 for r in ratios.values()),
         "figures": ", ".join(f"cloud/{n} {r:.1f}x" for n, r in ratios.items())},
    ]  # fmt: skip
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    plot(summary, out / "energy_routing.png")
    print(f"\n{'region':16} {'tier':9} {'J/request':>10} {'u$/request':>11} {'engine p50 ms':>14}")
    for name, v in tiers.items():
        print(
            f"{name:16} {v['tier']:9} {v['mean_energy_j']:10.3f} {v['mean_usd'] * 1e6:11.2f} {v['p50_engine_ms']:14.1f}"
        )
    print()
    for t in summary["targets"]:
        print(f"{'met ' if t['met'] else 'MISS'} {t['target']}: {t['figures']}")
    print(f"wrote {out / 'summary.json'} and {out / 'energy_routing.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

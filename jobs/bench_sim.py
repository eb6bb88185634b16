"""Benchmark the fleet simulator: 10,000 nodes in 50 regions, exactness against SimPy, scaling.

    python jobs/bench_sim.py --out results/sim [--quick]
    ray job submit --working-dir . -- python jobs/bench_sim.py --out results/sim

No cluster: the simulator is numpy in this process. It runs
- the headline: 10,000 nodes x 50 regions x 100 rounds of a local step plus a hierarchical all-reduce of a
  1M-parameter model, with jitter and loss, 5% permanent stragglers (5x), 2% transient ones per round and
  churn from each tier's availability and MTBF (target: <= 10 s here);
- exactness: 2,000 nodes x 20 regions, the vectorised engine and one SimPy process per node on the same
  sampled costs (target: max difference 0 over every node's clock after every round);
- scaling: 100 to 10,000 nodes, modelled time per round and phase and bytes per link class, each checked
  against the closed forms (intra: 2 sum(k_r - 1) x 4P bytes, inter: 2(L-1) x the chunks' encoded bytes);
- strategies: hierarchical, DiLoCo (h 20), Streaming DiLoCo (h 20, 4 fragments, overlap 1), gossip, async
  and SSP (bound 3) on the headline fleet for 100 rounds,
  and sync's flat ring on a 1,000-node fleet (2(n-1) steps a round) (target: <= 60 s together);
- serving: 1M requests (Poisson, 1,500/s, by region size, 300 ms budget) through the region router's
  policy on the 10,000-node fleet with one replica per 100 nodes (target: <= 60 s here).
Loss of the model is not simulated. Writes DIR/summary.json, DIR/scaling.png and prints a table.
--quick: 2,000 nodes for the headline, 500 for exactness, 100,000 requests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeray.atomic import write_atomic
from edgeray.fabric.codecs import get_codec
from edgeray.sim.engine import RoundConfig, simulate
from edgeray.sim.fleet import FleetSpec, generate
from edgeray.sim.oracle import replay
from edgeray.sim.serving import ServingConfig, simulate_serving

PARAMS = 1_000_000


def closed_form(sizes: list[int], params: int, codec: str) -> tuple[int, int]:
    """(intra, inter) payload bytes of one hierarchical all-reduce over regions of ``sizes`` live nodes."""
    chunks = np.array_split(np.arange(params), len(sizes))
    per_step = sum(get_codec(codec).nbytes(len(c)) for c in chunks)
    return 2 * sum(k - 1 for k in sizes) * params * 4, 2 * (len(sizes) - 1) * per_step if len(
        sizes
    ) > 1 else 0


def headline(nodes: int, regions: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    topo = generate(FleetSpec(nodes=nodes, regions=regions, stragglers=0.05, seed=0))
    t1 = time.perf_counter()
    result = simulate(topo, RoundConfig(params=PARAMS, rounds=100, transient=0.02, seed=0))
    t2 = time.perf_counter()
    return {**result.summary(), "generate_wall_s": t1 - t0, "simulate_wall_s": t2 - t1}


def exactness(nodes: int, regions: int) -> dict[str, Any]:
    topo = generate(FleetSpec(nodes=nodes, regions=regions, stragglers=0.1, availability=0.9, mtbf_s=600))
    config = RoundConfig(params=100_000, rounds=10, transient=0.05, codec="int8", seed=1)
    t0 = time.perf_counter()
    result = simulate(topo, config, trace=True)
    t1 = time.perf_counter()
    reference = replay(result)
    t2 = time.perf_counter()
    assert result.clocks is not None
    diff = max(float(np.nanmax(np.abs(a - b))) for a, b in zip(result.clocks, reference, strict=True))
    same_rounds = all(
        np.array_equal(np.isnan(a), np.isnan(b)) for a, b in zip(result.clocks, reference, strict=True)
    )
    return {
        "nodes": nodes,
        "regions": regions,
        "rounds": config.rounds,
        "live_min": min(r["live"] for r in result.rows),
        "max_abs_difference_s": diff,
        "same_live_sets": same_rounds,
        "engine_wall_s": t1 - t0,
        "simpy_wall_s": t2 - t1,
    }


def scaling(sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    rows = []
    for nodes, regions in sizes:
        topo = generate(FleetSpec(nodes=nodes, regions=regions, seed=0))
        t0 = time.perf_counter()
        result = simulate(topo, RoundConfig(params=PARAMS, rounds=10, churn=False, seed=0))
        wall = time.perf_counter() - t0
        first = result.rows[0]
        want = closed_form([len(r.nodes) for r in topo.regions.values()], PARAMS, "none")
        s = result.summary()
        rows.append(
            {
                "nodes": nodes,
                "regions": regions,
                "round_s": s["round_s_median"],
                **s["phase_s_median"],
                "intra_region_bytes": first["intra_region_bytes"],
                "inter_region_bytes": first["inter_region_bytes"],
                "bytes_equal_closed_form": (first["intra_region_bytes"], first["inter_region_bytes"]) == want,
                "wall_s_per_round": wall / 10,
            }
        )
    return rows


def strategies(nodes: int, regions: int, rounds: int, ring_nodes: int) -> dict[str, Any]:
    """Every simulated training strategy at fleet scale, 5% stragglers, 2% transient ones: wall seconds
    each. ``sync``'s flat ring (2(n-1) steps a round) runs on a ``ring_nodes`` fleet."""
    from edgeray.sim.gossip import GossipConfig, simulate_gossip
    from edgeray.sim.server import ServerConfig, simulate_server
    from edgeray.sim.streaming import StreamingConfig, simulate_streaming

    big = generate(FleetSpec(nodes=nodes, regions=regions, stragglers=0.05, seed=0))
    small = generate(FleetSpec(nodes=ring_nodes, regions=max(1, regions * ring_nodes // nodes), seed=0))
    runs: dict[str, Any] = {}
    for name, call in [
        ("hierarchical", lambda: simulate(big, RoundConfig(params=PARAMS, rounds=rounds, transient=0.02))),
        ("diloco", lambda: simulate(big, RoundConfig(params=PARAMS, rounds=rounds, transient=0.02, local_steps=20))),
        ("streaming-diloco", lambda: simulate_streaming(big, StreamingConfig(params=PARAMS, rounds=rounds, h=20,
                                                                             transient=0.02))),
        ("gossip", lambda: simulate_gossip(big, GossipConfig(params=PARAMS, rounds=rounds, transient=0.02))),
        ("async", lambda: simulate_server(big, ServerConfig(params=PARAMS, rounds=rounds, transient=0.02))),
        ("ssp", lambda: simulate_server(big, ServerConfig(params=PARAMS, rounds=rounds, transient=0.02, bound=3))),
        ("sync", lambda: simulate(small, RoundConfig(params=PARAMS, rounds=rounds, transient=0.02, allreduce="ring"))),
    ]:  # fmt: skip
        t0 = time.perf_counter()
        s = call().summary()
        runs[name] = {"wall_s": time.perf_counter() - t0, "modelled_s": s["modelled_s"],
                      "nodes": ring_nodes if name == "sync" else nodes}  # fmt: skip
    return {"rounds": rounds, "runs": runs, "wall_s": sum(r["wall_s"] for r in runs.values())}


def serving(nodes: int, regions: int, requests: int) -> dict[str, Any]:
    """The inference workload at fleet scale: Poisson arrivals by region size, one replica per 100 nodes,
    a 300 ms first-token budget, through the region router's own policy. (At the app's default 100 ms the
    generated fleet rejects most requests: device regions' links plus a batch of 16 leave little room.)"""
    topo = generate(FleetSpec(nodes=nodes, regions=regions, seed=0))
    config = ServingConfig(
        requests=requests, rate_per_s=1500.0, nodes_per_replica=100, budget_ms=300.0, seed=0
    )
    result = simulate_serving(topo, config)
    s = result.summary()
    worst = max(s["regions"].values(), key=lambda r: r["ttft_p95_ms"] or 0.0)
    return {
        "nodes": nodes,
        "regions": regions,
        "replicas": sum(-(-len(r.nodes) // 100) for r in topo.regions.values()),
        "budget_ms": config.budget_ms,
        "rate_per_s": config.rate_per_s,
        **{k: v for k, v in s.items() if k not in ("regions", "service")},
        "worst_region_ttft_p95_ms": worst["ttft_p95_ms"],
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["scaling"]
    nodes = [r["nodes"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = np.zeros(len(rows))
    for phase in ("compute_s", "reduce_s", "ring_s", "broadcast_s"):
        vals = np.array([r[phase] for r in rows])
        a.bar([str(n) for n in nodes], vals, bottom=bottom, label=phase.removesuffix("_s"))
        bottom += vals
    a.set_xlabel("nodes (regions: " + ", ".join(str(r["regions"]) for r in rows) + ")")
    a.set_ylabel("modelled seconds per round (median)")
    a.set_title("hierarchical all-reduce of 1M parameters")
    a.legend()
    b.loglog(nodes, [r["intra_region_bytes"] / 2**20 for r in rows], marker="o", label="intra-region")
    b.loglog(nodes, [r["inter_region_bytes"] / 2**20 for r in rows], marker="o", label="inter-region")
    b.set_xlabel("nodes")
    b.set_ylabel("MiB per round")
    b.set_title("bytes per link class (loss is not simulated)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def targets(summary: dict[str, Any]) -> list[tuple[str, bool, str]]:
    h, e = summary["headline"], summary["exactness"]
    return [
        (
            f"{h['nodes']} nodes x {h['regions']} regions x 100 rounds <= 10 s",
            h["simulate_wall_s"] <= 10,
            f"{h['simulate_wall_s']:.2f} s (generating the fleet: {h['generate_wall_s']:.2f} s)",
        ),
        (
            f"numpy engine == SimPy oracle on {e['nodes']} nodes (max difference 0)",
            e["max_abs_difference_s"] == 0 and e["same_live_sets"],
            f"max |difference| {e['max_abs_difference_s']:g} s over {e['rounds']} rounds; engine "
            f"{e['engine_wall_s']:.2f} s, SimPy {e['simpy_wall_s']:.2f} s",
        ),
        (
            "payload bytes equal the closed forms",
            all(r["bytes_equal_closed_form"] for r in summary["scaling"]),
            ", ".join(str(r["nodes"]) for r in summary["scaling"]) + " nodes",
        ),
        (
            "all training strategies together <= 60 s (sync's flat ring on "
            f"{summary['strategies']['runs']['sync']['nodes']} nodes; EASGD not yet)",
            summary["strategies"]["wall_s"] <= 60,
            ", ".join(f"{k} {v['wall_s']:.1f}" for k, v in summary["strategies"]["runs"].items())
            + f" = {summary['strategies']['wall_s']:.1f} s",
        ),
        (
            f"{summary['serving']['requests']:,} inference requests <= 60 s",
            summary["serving"]["wall_s"] <= 60,
            f"{summary['serving']['wall_s']:.1f} s",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/sim")
    parser.add_argument("--quick", action="store_true", help="2,000-node headline, 500-node exactness")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("headline ...", flush=True)
    summary: dict[str, Any] = {
        "headline": headline(2_000 if args.quick else 10_000, 20 if args.quick else 50)
    }
    print("exactness against SimPy ...", flush=True)
    summary["exactness"] = exactness(500 if args.quick else 2_000, 10 if args.quick else 20)
    print("scaling ...", flush=True)
    summary["scaling"] = scaling([(100, 5), (1_000, 20), (10_000, 50)])
    print("strategies ...", flush=True)
    summary["strategies"] = strategies(
        2_000 if args.quick else 10_000, 20 if args.quick else 50, 20 if args.quick else 100, 1_000
    )
    print("serving ...", flush=True)
    summary["serving"] = serving(2_000 if args.quick else 10_000, 20 if args.quick else 50,
                                 100_000 if args.quick else 1_000_000)  # fmt: skip
    summary["targets"] = [{"target": t, "met": ok, "value": v} for t, ok, v in targets(summary)]
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    plot(summary, out / "scaling.png")
    h = summary["headline"]
    print(
        f"\n{h['nodes']} nodes, {h['regions']} regions, 100 rounds: modelled {h['modelled_s']:.0f} s "
        f"(round median {h['round_s_median']:.1f} s), inter-region {h['inter_region_bytes'] / 2**30:.1f} GiB, "
        f"energy {h['energy_j'] / 3.6e6:.1f} kWh, fewest live {h['live_min']}"
    )
    print(f"\n{'nodes':>7} {'regions':>7} {'round s':>9} {'compute':>8} {'reduce':>8} {'ring':>8} {'bcast':>8} "
          f"{'intra MiB':>10} {'inter MiB':>10} {'wall ms/round':>14}")  # fmt: skip
    for r in summary["scaling"]:
        print(
            f"{r['nodes']:>7} {r['regions']:>7} {r['round_s']:>9.2f} {r['compute_s']:>8.2f} {r['reduce_s']:>8.2f} "
            f"{r['ring_s']:>8.2f} {r['broadcast_s']:>8.2f} {r['intra_region_bytes'] / 2**20:>10.0f} "
            f"{r['inter_region_bytes'] / 2**20:>10.0f} {r['wall_s_per_round'] * 1e3:>14.1f}"
        )
    v = summary["serving"]
    print(
        f"\nserving: {v['requests']:,} requests at {v['rate_per_s']:g}/s on {v['nodes']} nodes, {v['regions']} "
        f"regions, {v['replicas']} replicas, {v['budget_ms']:g} ms budget: TTFT p50 {v['ttft_p50_ms']:.1f} ms, p95 {v['ttft_p95_ms']:.1f} ms "
        f"(worst region p95 {v['worst_region_ttft_p95_ms']:.1f}); in region {v['in_region']:.1%}, spilled "
        f"{v['spilled']:.1%}, rejected {v['rejected']:.1%}; modelled {v['modelled_s']:.0f} s"
    )
    print()
    for t, ok, v in targets(summary):
        print(f"{'met ' if ok else 'MISS'} {t}: {v}")
    print(f"\nwrote {out / 'summary.json'} and {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

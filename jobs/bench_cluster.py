"""Benchmark the cluster spine: time to bring a topology up, place one actor per region, probe, tear down.

    python jobs/bench_cluster.py --topology clusters/local.yaml --out results/bench [--repeats 2]

Writes DIR/cluster_summary.json and prints a table. Timings are wall-clock on whatever machine runs it
(noisy on shared 2-core machines): read them as the cost of starting N raylets here, not as constants.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import ray

from edgeray import cluster
from edgeray.atomic import write_atomic
from edgeray.demo import place_one_actor_per_region
from edgeray.topology import load_topology, resolve_topology_path


def run_once(topology_path: Path, name: str) -> dict[str, float]:
    topo = load_topology(topology_path)
    t0 = time.perf_counter()
    state = cluster.up(topo, name=name)
    t_up = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        cluster.probe_nodes(state.address, state.env())
        t_probe = time.perf_counter() - t1
        saved = dict(os.environ)
        cluster.use_cluster(state)
        ray.init(logging_level="ERROR", log_to_driver=False)
        try:
            t2 = time.perf_counter()
            reports = place_one_actor_per_region(topo)
            t_place = time.perf_counter() - t2
        finally:
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved)
        if not all(r["ok"] for r in reports):
            raise SystemExit(f"misplaced actors: {reports}")
    finally:
        t3 = time.perf_counter()
        stopped = cluster.down(name)
        t_down = time.perf_counter() - t3
    return {
        "nodes": len(topo.nodes),
        "regions": len(topo.regions),
        "up_s": t_up,
        "probe_s": t_probe,
        "place_per_region_s": t_place,
        "down_s": t_down,
        "processes_stopped": len(stopped),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="local")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    path = resolve_topology_path(args.topology)
    runs = []
    for i in range(args.repeats):
        print(f"run {i + 1}/{args.repeats}: up -> place -> down on {path.name} ...", flush=True)
        runs.append(run_once(path, name=f"bench-{os.getpid()}"))
    keys = ["up_s", "probe_s", "place_per_region_s", "down_s"]
    summary = {
        "topology": str(path),
        "nodes": runs[0]["nodes"],
        "regions": runs[0]["regions"],
        "runs": runs,
        "median": {k: statistics.median(r[k] for r in runs) for k in keys},
        "up_s_per_raylet": statistics.median(r["up_s"] for r in runs) / (runs[0]["nodes"] + 1),
    }
    out = Path(args.out)
    write_atomic(out / "cluster_summary.json", json.dumps(summary, indent=2))
    print(f"\n{'metric':24} {'median':>9} " + " ".join(f"{'run' + str(i + 1):>8}" for i in range(len(runs))))
    for k in keys:
        print(f"{k:24} {summary['median'][k]:9.2f} " + " ".join(f"{r[k]:8.2f}" for r in runs))
    print(f"{'up_s per raylet (+head)':24} {summary['up_s_per_raylet']:9.2f}")
    print(f"wrote {out / 'cluster_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What mutual TLS on Ray's gRPC costs: the same benchmarks on a plain and on a `--tls` cluster.

    python jobs/bench_tls.py --topology local --out results/tls [--rounds 2]

For each round, starts the topology as a plain cluster and as a TLS one (edgeray.cluster.up(tls=True)),
one after the other on this machine, and on each measures:

- the fabric benchmark (jobs/bench_fabric.py, quick sizes): measured seconds of every collective. The
  fabric's tensors travel over torch's gloo sockets, which Ray's TLS does not cover, so this shows what
  TLS does to a training step's collectives through Ray's control path only;
- Ray's own data path, which TLS encrypts: an actor on one region's node hands the driver (on the head) a
  4, 16 and 64 MB array through the object store (median of 5), and the round trip of an empty actor call
  (median of 200).

Writes OUT/summary.json (each round's figures and the TLS / plain ratios) and OUT/tls_overhead.png, and
prints a table. Timings are ratios measured in one run on one machine: the two clusters take turns.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fabric import bench as bench_fabric

from edgeray import cluster
from edgeray.atomic import write_atomic
from edgeray.placement import pin, wait_ready
from edgeray.topology import Topology, load_topology, resolve_topology_path

SIZES_MB = (4, 16, 64)
OPS = ("flat", "flat_region_ordered", "hierarchical", "gossip")


@ray.remote(num_cpus=0)
class Holder:
    def ping(self) -> int:
        return 0

    def array(self, mb: int) -> np.ndarray:
        return np.ones(mb * 2**20 // 8, dtype=np.float64)


def ray_path(topo: Topology) -> dict[str, float]:
    """Object-store transfers from an actor on the last region's node to the driver, and call round trips."""
    region = list(topo.regions)[-1]
    holder = pin(Holder, region=region).remote()
    try:
        wait_ready([holder], timeout_s=120)
        out: dict[str, float] = {}
        for mb in SIZES_MB:
            took = []
            for _ in range(5):
                ref = holder.array.remote(mb)
                t0 = time.perf_counter()
                got = ray.get(ref, timeout=120)
                took.append(time.perf_counter() - t0)
                assert got.nbytes == mb * 2**20
                del got, ref
            out[f"object {mb} MB s"] = statistics.median(took)
        calls = []
        for _ in range(200):
            t0 = time.perf_counter()
            ray.get(holder.ping.remote(), timeout=60)
            calls.append(time.perf_counter() - t0)
        out["actor call ms"] = statistics.median(calls) * 1e3
        return out
    finally:
        ray.kill(holder)


def one(topo: Topology, tls: bool, out: Path, progress: Any) -> dict[str, float]:
    name = f"bench-tls-{'tls' if tls else 'plain'}-{os.getpid()}"
    t0 = time.perf_counter()
    state = cluster.up(topo, name=name, tls=tls)
    saved = dict(os.environ)
    try:
        figures = {"cluster up s": time.perf_counter() - t0}
        cluster.use_cluster(state)
        ray.init(logging_level=logging.ERROR, log_to_driver=False)
        fabric = bench_fabric(topo, [1 / 16, 4, 16], out / "fabric")
        for op in OPS:
            for size, row in fabric[op].items():
                figures[f"{op} {size} s"] = row["measured_s"]
        figures |= ray_path(topo)
        progress(f"  {'tls' if tls else 'plain'}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
        return figures
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        cluster.down(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default=os.environ.get("EDGERAY_TOPOLOGY") or "local")
    parser.add_argument("--out", default="results/tls")
    parser.add_argument("--rounds", type=int, default=1, help="plain and TLS clusters take turns this often")
    args = parser.parse_args(argv)
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        print("bench_tls starts its own plain and TLS clusters: run it outside a cluster (unset RAY_ADDRESS)")
        return 2
    topo = load_topology(resolve_topology_path(args.topology))
    out = Path(args.out)
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        rounds.append(
            {
                mode: one(topo, mode == "tls", out / f"round{r + 1}" / mode, lambda m: print(m, flush=True))
                for mode in ("plain", "tls")
            }
        )
    keys = list(rounds[0]["plain"])
    median = {
        mode: {k: statistics.median(rd[mode][k] for rd in rounds) for k in keys} for mode in ("plain", "tls")
    }
    ratio = {k: median["tls"][k] / median["plain"][k] for k in keys}
    summary = {"topology": topo.name, "rounds": rounds, "median": median, "tls_over_plain": ratio}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    print(f"\n{'measure':36} {'plain':>10} {'tls':>10} {'tls/plain':>10}")
    for k in keys:
        print(f"{k:36} {median['plain'][k]:10.4g} {median['tls'][k]:10.4g} {ratio[k]:10.2f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    shown = [k for k in keys if k != "cluster up s"]
    ax.barh(
        shown,
        [ratio[k] for k in shown],
        color=["C1" if k.startswith(("object", "actor")) else "C0" for k in shown],
    )
    ax.axvline(1.0, c="grey", ls="--")
    ax.set_xlabel("time with TLS / time without (median of rounds)")
    ax.set_title(
        f"mutual TLS on Ray's gRPC, {topo.name} preset\nblue: fabric collectives (gloo), orange: Ray's data path"
    )
    fig.tight_layout()
    fig.savefig(out / "tls_overhead.png", dpi=110)
    print(f"wrote {out / 'summary.json'} and {out / 'tls_overhead.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

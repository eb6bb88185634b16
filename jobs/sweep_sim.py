"""Sweep the fleet simulator over fleet sizes x strategies, each scenario a Ray task on the cluster.

    python jobs/sweep_sim.py --out results/sweep                          # no cluster: one after another
    eval "$(edgeray env)"; python jobs/sweep_sim.py --out /tmp/sweep      # tasks on that cluster
    ray job submit --working-dir . -- python jobs/sweep_sim.py --sizes 100:5,1000:20 --out /tmp/sweep

Each scenario generates its fleet (``nodes:regions``, 5% stragglers, seeded) and simulates ``--rounds``
rounds of each ``--workloads`` strategy (edgeray.sim.sweep). With RAY_ADDRESS set, or inside `ray job
submit`, the scenarios run as Ray tasks (one CPU each) on that cluster; otherwise in this process. Writes
DIR/sweep.parquet (one row per scenario), DIR/summary.json and DIR/sweep.png (modelled seconds per step and
inter-region bytes per step against fleet size, one line per strategy) and prints a table. Loss is not
simulated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from edgeray.atomic import write_atomic
from edgeray.sim.engine import SimError
from edgeray.sim.report import LOSS_NOTE
from edgeray.sim.sweep import WORKLOADS, Scenario, sweep


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            nodes, regions = (int(x) for x in part.split(":"))
        except ValueError:
            raise SimError(f"--sizes {text!r}: each size is NODES:REGIONS, e.g. 1000:20") from None
        out.append((nodes, regions))
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for w in dict.fromkeys(r["workload"] for r in rows):
        mine = sorted((r for r in rows if r["workload"] == w), key=lambda r: r["nodes"])
        x = [r["nodes"] for r in mine]
        a.loglog(x, [r["s_per_step"] for r in mine], marker="o", label=w)
        b.loglog(x, [max(r["inter_bytes_per_step"], 1.0) / 2**20 for r in mine], marker="o", label=w)
    a.set_xlabel("nodes")
    a.set_ylabel("modelled seconds per step")
    a.set_title("time per step (every worker's local step)")
    b.set_xlabel("nodes")
    b.set_ylabel("inter-region MiB per step")
    b.set_title("WAN bytes per step (loss is not simulated)")
    for ax in (a, b):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100:5,1000:20,10000:50", help="NODES:REGIONS,...")
    p.add_argument("--workloads", default="hierarchical,diloco,async,ssp", help=",".join(WORKLOADS))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--local-steps", type=int, default=20, help="DiLoCo's h")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=3600.0, help="the whole sweep's bound")
    p.add_argument("--out", default="results/sweep")
    args = p.parse_args(argv)
    try:
        scenarios = [
            Scenario(
                w, n, r, rounds=args.rounds, params=args.params, local_steps=args.local_steps, seed=args.seed
            )
            for n, r in parse_sizes(args.sizes)
            for w in args.workloads.split(",")
        ]
        use_ray = bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))
        print(
            f"{len(scenarios)} scenarios " + ("as Ray tasks on the cluster" if use_ray else "in this process")
        )
        if use_ray:
            import logging

            import ray

            ray.init(logging_level=logging.ERROR, log_to_driver=False)
        try:
            rows = sweep(scenarios, use_ray=use_ray, timeout_s=args.timeout_s)
        finally:
            if use_ray:
                ray.shutdown()
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".sweep.parquet.{os.getpid()}.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, out / "sweep.parquet")
    write_atomic(out / "summary.json", json.dumps({"scenarios": rows, "note": LOSS_NOTE}, indent=2))
    plot(rows, out / "sweep.png")
    print(
        f"\n{'workload':>13} {'nodes':>6} {'regions':>7} {'s/step':>9} {'inter MiB/step':>15} {'wall s':>7}"
    )
    for r in rows:
        print(
            f"{r['workload']:>13} {r['nodes']:>6} {r['regions']:>7} {r['s_per_step']:>9.2f} "
            f"{r['inter_bytes_per_step'] / 2**20:>15.1f} {r['wall_s']:>7.1f}"
        )
    print(f"\n{LOSS_NOTE}. Wrote {out}/sweep.parquet, summary.json and sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

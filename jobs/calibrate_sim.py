"""Calibrate the fleet simulator against the emulated cluster: fit, then check on held-out sizes.

    python jobs/calibrate_sim.py --out results/calibration [--topology local] [--quick]
    ray job submit --working-dir . -- python jobs/calibrate_sim.py --out results/calibration

On the cluster (the one this job runs in, the one RAY_ADDRESS names, or a fresh local one), one fabric
worker per topology node runs each strategy's all-reduce (hierarchical: sync-hier and DiLoCo; sync: the flat
ring) on several sizes, several times each, and reports its modelled clock after each phase
(edgeray/sim/calibrate.py). The simulator runs the same all-reduce on the same topology. The job fits the
simulator's two free parameters (per-message overhead, effective goodput) on the training sizes and reports,
per strategy, size and phase, the emulated and simulated medians before and after calibration, marking the
held-out sizes. Target: held-out per-phase medians within 10%.

Writes DIR/emulated.parquet (every emulated run), DIR/comparison.parquet, DIR/calibration.json (the fitted
parameters: RoundConfig(overhead_s=..., goodput=...), or `edgeray sim --calibration DIR/calibration.json`),
DIR/summary.json, DIR/calibration.png, and prints a table.
Sizes: 10k, 100k, 1M and 4M float32 values; the fit uses 10k (latency-bound) and 4M (bandwidth-bound), and
100k and 1M are held out: there WAN loss makes a ring's time bimodal (a retransmission adds two latencies or
not), so medians need many repetitions (25; --quick 9).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from edgeray import cluster
from edgeray.atomic import write_atomic
from edgeray.sim.calibrate import TOLERANCE, compare, emulate, fit_calibration
from edgeray.topology import load_topology, resolve_topology_path

FIT_SEEDS = range(20)
"""Simulated rounds per (strategy, size) while fitting (each candidate point simulates them all)."""
SEEDS = range(200)
"""Simulated rounds per (strategy, size) in the comparison: WAN loss makes a ring's time heavy-tailed."""


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)


def plot(report: list[dict[str, Any]], path: Path) -> None:
    """Per strategy: simulated / emulated median of each phase against the size, before and after the
    calibration, with the tolerance band; held-out sizes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(r["strategy"] for r in report))
    fig, axes = plt.subplots(1, len(strategies), figsize=(6.5 * len(strategies), 4.2), squeeze=False)
    for ax, strategy in zip(axes[0], strategies, strict=True):
        mine = [r for r in report if r["strategy"] == strategy]
        sizes = sorted({r["values"] for r in mine})
        ax.axhspan(1 - TOLERANCE, 1 + TOLERANCE, color="#2a9d8f", alpha=0.12, label=f"±{TOLERANCE:.0%}")
        for i, phase in enumerate(dict.fromkeys(r["phase"] for r in mine)):
            rows = sorted((r for r in mine if r["phase"] == phase), key=lambda r: r["values"])
            xs = [r["values"] for r in rows]
            ax.plot(xs, [1 + r["raw_error"] for r in rows], ls="--", marker="x", color=f"C{i}", alpha=0.6)
            ax.plot(xs, [1 + r["error"] for r in rows], marker="o", color=f"C{i}", label=phase)
        for size in sizes:
            if any(r["held_out"] for r in mine if r["values"] == size):
                ax.axvline(size, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("float32 values all-reduced (dotted: held out)")
        ax.set_ylabel("simulated / emulated median")
        ax.set_title(f"{strategy}: calibrated (solid), uncalibrated (dashed)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default=os.environ.get("EDGERAY_TOPOLOGY") or "local")
    p.add_argument("--out", default="results/calibration")
    p.add_argument("--quick", action="store_true", help="9 repetitions per size instead of 25")
    p.add_argument("--reps", type=int, default=None, help="emulated repetitions per size (25; --quick 9)")
    args = p.parse_args(argv)
    topo = load_topology(resolve_topology_path(args.topology))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [10_000, 100_000, 1_000_000, 4_000_000]
    train = [10_000, 4_000_000]  # held out: 100k and 1M between them
    reps = args.reps or (9 if args.quick else 25)
    if reps < 1:
        p.error(f"--reps {reps}: must be >= 1")
    print(
        f"emulating on {topo.name} ({len(topo.nodes)} nodes): sizes {sizes}, {reps} repetitions", flush=True
    )
    with cluster.driver(topo, name=f"calibrate-{os.getpid()}"):
        rows = emulate(
            topo, sizes, reps, name=f"calibrate-{os.getpid()}", progress=lambda m: print(m, flush=True)
        )
    _write_parquet(out / "emulated.parquet", rows)
    print(f"fitting on {train} ...", flush=True)
    fit = fit_calibration(topo, rows, train=train, seeds=FIT_SEEDS)
    report = compare(topo, rows, fit, seeds=SEEDS)
    _write_parquet(out / "comparison.parquet", report)
    write_atomic(out / "calibration.json", json.dumps(fit.to_dict(), indent=2))
    held = [r for r in report if r["held_out"] and r["phase"] != "round"]
    by_strategy = {
        s: {
            "max_abs_error": max(abs(r["error"]) for r in held if r["strategy"] == s),
            "max_abs_raw_error": max(abs(r["raw_error"]) for r in held if r["strategy"] == s),
            "met": all(r["within"] for r in held if r["strategy"] == s),
        }
        for s in dict.fromkeys(r["strategy"] for r in held)
    }
    summary = {
        "topology": topo.name,
        "sizes": sizes,
        "train_sizes": train,
        "reps": reps,
        "sim_seeds": {"fit": len(FIT_SEEDS), "comparison": len(SEEDS)},
        "calibration": fit.to_dict(),
        "held_out": by_strategy,
        "targets": [
            {
                "target": f"{s}: held-out per-phase medians within {TOLERANCE:.0%} of the emulated runs",
                "met": v["met"],
                "value": f"max |error| {v['max_abs_error']:.1%} (uncalibrated {v['max_abs_raw_error']:.1%})",
            }
            for s, v in by_strategy.items()
        ],
        "comparison": report,
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    plot(report, out / "calibration.png")
    print(f"\ncalibration: overhead {fit.overhead_s * 1e3:.3f} ms per message, goodput {fit.goodput:.3f}")
    print(f"{'strategy':13} {'values':>10} {'phase':10} {'emulated ms':>12} {'sim raw ms':>11} {'sim ms':>8} "
          f"{'error':>7}  held out")  # fmt: skip
    for r in report:
        print(
            f"{r['strategy']:13} {r['values']:>10,} {r['phase']:10} {r['emulated_s'] * 1e3:12.2f} "
            f"{r['simulated_raw_s'] * 1e3:11.2f} {r['simulated_s'] * 1e3:8.2f} {r['error']:+7.1%}  "
            + ("yes" if r["held_out"] else "")
        )
    for t in summary["targets"]:
        print(f"[{'MET' if t['met'] else 'not met'}] {t['target']}: {t['value']}")
    print(
        f"wrote {out}/summary.json, calibration.json, emulated.parquet, comparison.parquet, calibration.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

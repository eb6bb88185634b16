"""Compare every sync strategy on one topology: same data, seeds and token budget.

    python jobs/compare_sync.py --topology clusters/local.yaml --out results/sync [--quick]
    eval "$(edgeray env)"; ray job submit --working-dir . -- python jobs/compare_sync.py --out /tmp/sync --quick

Three scenarios on the same cluster: every node at its topology speed; one node ``--straggler`` times
slower for the whole run (default: the last node of the first region, 5x); the same node slower for a
fifth of the run only, from a seeded instant (``--transient``). For each strategy: final validation loss,
inter-region bytes (from the ledger) and modelled wall time. Prints a table and the targets; writes
DIR/summary.json (``{"strategies": {NAME: {"final_val_loss", "inter_region_bytes", "modelled_wall_s",
...}}, "straggler": {...}, "targets": [...]}``; the synchronous all-reduce baseline is ``sync``), each run's
directory under DIR/runs/, and DIR/loss_vs_time.png, DIR/loss_vs_bytes.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgeray import cluster
from edgeray.atomic import write_atomic
from edgeray.topology import Topology, load_topology, resolve_topology_path
from edgeray.train.sync import STRATEGIES, SyncError, WorkerPool, prepare_data, run_sync
from edgeray.train.sync_report import plot, table, targets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_sync import add_run_arguments, config_from


def default_straggler(topology: Topology) -> str:
    first = next(iter(topology.regions.values()))
    return first.nodes[-1].name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/sync")
    p.add_argument("--quick", action="store_true", help="a small budget (CI-sized)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument(
        "--straggler", default=None, metavar="NODE=FACTOR", help="default: first region's last node=5"
    )
    p.add_argument("--no-straggler", action="store_true")
    p.add_argument(
        "--transient",
        default=None,
        metavar="NODE=FACTOR",
        help="transient straggler: that node FACTOR x slower for a fifth of the run, from a seeded instant "
        "(default: the same node as --straggler, 5x)",
    )
    p.add_argument("--no-transient", action="store_true")
    p.add_argument("--diloco-codec", default="int8", help="codec of DiLoCo's outer all-reduce")
    add_run_arguments(p)
    p.set_defaults(steps=120, diloco_h=30)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.seq_len, args.diloco_h = 12, 2, 32, 6
    topology = load_topology(resolve_topology_path(args.topology))
    strategies = args.strategies.split(",")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        p.error(f"--strategies: unknown {unknown}; valid: {list(STRATEGIES)}")

    def node_factor(flag: str, spec: str | None) -> tuple[str, float]:
        spec = spec or f"{default_straggler(topology)}=5"
        node, _, factor = spec.partition("=")
        if node not in topology.nodes:
            p.error(f"{flag} {spec!r}: node {node!r} is not in the topology; nodes: {sorted(topology.nodes)}")
        try:
            return node, float(factor or 5)
        except ValueError:
            p.error(f"{flag} {spec!r}: expected NODE=FACTOR, e.g. campus-jetson=5")

    straggler = None if args.no_straggler else node_factor("--straggler", args.straggler)
    transient = None
    if not args.no_transient:
        node, factor = node_factor("--transient", args.transient)
        start = round(random.Random(args.seed).uniform(0.0, 0.8), 3)
        transient = (node, factor, start, round(start + 0.2, 3))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(topology, out / "data", seq_len=args.seq_len, non_iid=args.non_iid)
    nodes = args.nodes.split(",") if args.nodes else list(topology.nodes)
    summary: dict[str, Any] = {
        "topology": str(topology.path),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "strategies": {},
    }

    def brief(r: dict[str, Any]) -> dict[str, Any]:
        keys = ("final_val_loss", "inter_region_bytes", "modelled_wall_s", "tokens", "steps", "evals")
        extra: dict[str, Any] = {
            k: r[k]
            for k in (
                "max_staleness",
                "max_ahead",
                "waits",
                "dropped",
                "outer_syncs",
                "fragments",
                "peak_outer_inter_region_bytes",
            )
            if k in r
        }
        if "energy" in r:  # joules and dollars per step and per tier (edgeray.energy), not per node
            extra["energy"] = {
                k: r["energy"][k] for k in ("joules", "usd", "by_tier", "per_step") if k in r["energy"]
            }
            extra["drained"] = r.get("drained", [])
        return {**{k: r[k] for k in keys}, **extra}

    with cluster.driver(topology, name=f"compare-{os.getpid()}"), WorkerPool() as pool:
        scenarios: list[tuple[str, dict[str, float], dict[str, Any]]] = [
            ("strategies", {}, summary["strategies"])
        ]
        if straggler:
            summary["straggler"] = {"node": straggler[0], "factor": straggler[1], "strategies": {}}
            scenarios.append(("straggler", {straggler[0]: straggler[1]}, summary["straggler"]["strategies"]))
        if transient:
            node, factor, begin, end = transient
            summary["transient"] = {
                "node": node,
                "factor": factor,
                "from": begin,
                "to": end,
                "strategies": {},
            }
            scenarios.append(("transient", {}, summary["transient"]["strategies"]))
        for scenario, slow, results in scenarios:
            for name in strategies:
                config = config_from(args, name, p, strict=False)
                if name == "diloco" and args.codec is None:  # the benchmark's DiLoCo: int8 outer all-reduce
                    config = replace(config, params=replace(config.params, codec=args.diloco_codec))
                config = replace(config, slowdown={**config.slowdown, **slow})
                if scenario == "transient" and transient:
                    config = replace(config, transient={transient[0]: transient[1:]})
                print(f"== {scenario}: {name}", flush=True)
                try:
                    r = run_sync(
                        config,
                        topology,
                        data_dir=data,
                        out=out / "runs" / scenario / name,
                        nodes=nodes,
                        progress=lambda m: print(m, flush=True),
                        pool=pool,
                        resumable=False,  # a comparison reruns rather than resumes
                    )
                except SyncError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                results[name] = brief(r)
                write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    summary["targets"] = targets(summary)
    summary["plots"] = plot(summary, out)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    print("\nequal speeds:\n" + table(summary["strategies"]))
    if straggler:
        print(f"\n{straggler[0]} {straggler[1]:g}x slower:\n" + table(summary["straggler"]["strategies"]))
    if transient:
        t = summary["transient"]
        print(
            f"\n{t['node']} {t['factor']:g}x slower from {t['from']:.0%} to {t['to']:.0%} of the budget:\n"
            + table(t["strategies"])
        )
    print()
    for t in summary["targets"]:
        print(f"[{'MET' if t['met'] else 'NOT MET'}] {t['target']}: {t['value']}")
    print(f"\nwrote {out / 'summary.json'}, {', '.join(summary['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

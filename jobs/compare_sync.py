"""Compare every sync strategy on one topology: same data, seeds and token budget.

    python jobs/compare_sync.py --topology clusters/local.yaml --out results/sync [--quick]
    eval "$(edgeray env)"; ray job submit --working-dir . -- python jobs/compare_sync.py --out /tmp/sync --quick

Two scenarios on the same cluster: every node at its topology speed, then one node ``--straggler`` times
slower (default: the last node of the first region, 5x). For each strategy: final validation loss,
inter-region bytes (from the ledger) and modelled wall time. Prints a table and the targets; writes
DIR/summary.json (``{"strategies": {NAME: {"final_val_loss", "inter_region_bytes", "modelled_wall_s",
...}}, "straggler": {...}, "targets": [...]}``; the synchronous all-reduce baseline is ``sync``), each run's
directory under DIR/runs/, and DIR/loss_vs_time.png, DIR/loss_vs_bytes.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from edgeray import cluster
from edgeray.atomic import write_atomic
from edgeray.topology import Topology, load_topology, resolve_topology_path
from edgeray.train.sync import STRATEGIES, SyncError, WorkerPool, prepare_data, run_sync

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_sync import add_run_arguments, config_from

MiB = 1 << 20


def default_straggler(topology: Topology) -> str:
    first = next(iter(topology.regions.values()))
    return first.nodes[-1].name


def table(results: dict[str, dict[str, Any]]) -> str:
    base = results.get("sync")
    lines = [
        f"{'strategy':<10} {'val loss':>9} {'vs sync':>8} {'inter-region MiB':>17} {'sync/x':>8} "
        f"{'modelled s':>11} {'x/sync':>7} {'tokens':>8}"
    ]
    for name, r in results.items():
        loss_rel = f"{r['final_val_loss'] / base['final_val_loss'] - 1:+.1%}" if base else ""
        bytes_x = (
            f"{base['inter_region_bytes'] / r['inter_region_bytes']:.1f}x"
            if base and r["inter_region_bytes"]
            else ""
        )
        time_x = f"{r['modelled_wall_s'] / base['modelled_wall_s']:.2f}" if base else ""
        lines.append(
            f"{name:<10} {r['final_val_loss']:>9.4f} {loss_rel:>8} {r['inter_region_bytes'] / MiB:>17.1f} "
            f"{bytes_x:>8} {r['modelled_wall_s']:>11.1f} {time_x:>7} {r['tokens']:>8}"
        )
    return "\n".join(lines)


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    s = summary["strategies"]
    if "sync" in s and "diloco" in s:
        ratio = s["sync"]["inter_region_bytes"] / max(s["diloco"]["inter_region_bytes"], 1)
        rel = s["diloco"]["final_val_loss"] / s["sync"]["final_val_loss"] - 1
        out.append(
            {
                "target": "DiLoCo: >= 100x fewer inter-region bytes than sync, val loss within 3%",
                "met": ratio >= 100 and rel <= 0.03,  # a lower loss than sync is within target too
                "value": f"{ratio:.0f}x fewer bytes, val loss {rel:+.2%}",
            }
        )
    if "sync" in s and "sync-hier" in s:
        rel = s["sync-hier"]["final_val_loss"] / s["sync"]["final_val_loss"] - 1
        fewer = s["sync-hier"]["inter_region_bytes"] < s["sync"]["inter_region_bytes"]
        out.append(
            {
                "target": "hierarchical sync: same loss as flat sync, fewer inter-region bytes",
                "met": abs(rel) <= 1e-3 and fewer,
                "value": f"val loss {rel:+.4%}, bytes {s['sync-hier']['inter_region_bytes'] / MiB:.0f} vs "
                f"{s['sync']['inter_region_bytes'] / MiB:.0f} MiB",
            }
        )
    slow = summary.get("straggler", {}).get("strategies", {})
    if "sync" in slow:
        for name in ("async", "ssp", "gossip", "diloco"):
            if name in slow:
                ratio = slow[name]["modelled_wall_s"] / slow["sync"]["modelled_wall_s"]
                out.append(
                    {
                        "target": f"one node {summary['straggler']['factor']:g}x slower: {name} finishes the "
                        "budget in <= 60% of sync's modelled wall time",
                        "met": ratio <= 0.60,
                        "value": f"{ratio:.0%} ({slow[name]['modelled_wall_s']:.1f} vs "
                        f"{slow['sync']['modelled_wall_s']:.1f} s)",
                    }
                )
    return out


def plot(summary: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    scenarios = [("all nodes at topology speed", summary["strategies"])]
    if summary.get("straggler"):
        st = summary["straggler"]
        scenarios.append((f"{st['node']} {st['factor']:g}x slower", st["strategies"]))
    for key, xlabel, scale, fname in (
        ("t_s", "modelled wall time (s)", 1.0, "loss_vs_time.png"),
        ("inter_region_bytes", "inter-region bytes (MiB, log)", 1 / MiB, "loss_vs_bytes.png"),
    ):
        fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.2), squeeze=False)
        for ax, (title, results) in zip(axes[0], scenarios, strict=True):
            for name, r in results.items():
                xs = [e[key] * scale for e in r["evals"]]
                ys = [e["val_loss"] for e in r["evals"]]
                if key == "inter_region_bytes":
                    xs = [max(x, 1e-3) for x in xs]
                ax.plot(xs, ys, marker="o", ms=3, label=name)
            if key == "inter_region_bytes":
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(str(out / fname))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/sync")
    p.add_argument("--quick", action="store_true", help="a small budget (CI-sized)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument(
        "--straggler", default=None, metavar="NODE=FACTOR", help="default: first region's last node=5"
    )
    p.add_argument("--no-straggler", action="store_true")
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
    straggler = None
    if not args.no_straggler:
        spec = args.straggler or f"{default_straggler(topology)}=5"
        node, _, factor = spec.partition("=")
        if node not in topology.nodes:
            p.error(
                f"--straggler {spec!r}: node {node!r} is not in the topology; nodes: {sorted(topology.nodes)}"
            )
        straggler = (node, float(factor or 5))
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
        extra = {k: r[k] for k in ("max_staleness", "max_ahead", "waits", "dropped") if k in r}
        return {**{k: r[k] for k in keys}, **extra}

    with cluster.driver(topology, name=f"compare-{os.getpid()}"), WorkerPool() as pool:
        scenarios = [("strategies", {}, summary["strategies"])]
        if straggler:
            summary["straggler"] = {"node": straggler[0], "factor": straggler[1], "strategies": {}}
            scenarios.append(("straggler", {straggler[0]: straggler[1]}, summary["straggler"]["strategies"]))
        for scenario, slow, results in scenarios:
            for name in strategies:
                config = config_from(args, name, p)
                config = type(config)(
                    **{
                        **config.__dict__,
                        "slowdown": {**config.slowdown, **slow},
                        "codec": args.diloco_codec if name == "diloco" else config.codec,
                    }
                )
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
    print()
    for t in summary["targets"]:
        print(f"[{'MET' if t['met'] else 'NOT MET'}] {t['target']}: {t['value']}")
    print(f"\nwrote {out / 'summary.json'}, {', '.join(summary['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sweep the MoE router's locality bias: inter-region dispatch bytes against validation loss.

    python jobs/bench_moe.py --topology clusters/local.yaml --out results/moe [--quick]

Trains the same MoE model (same data, seed and steps) once per bias value on one cluster, the unbiased
router (0) first, and reports per bias: inter-region bytes of token dispatch (hidden states out, results
back, gradients both ways), final validation loss, dropped tokens and expert load. Writes DIR/summary.json
(``{"sweep": [{"locality_bias", "inter_region_bytes", "val_loss", "dropped_tokens", ...}], "target": ...}``),
prints the table, and plots DIR/bytes_vs_loss.png and DIR/expert_load.png.
Target: a bias that cuts inter-region dispatch bytes by >= 50% with validation loss within 2% of bias 0.
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
from edgeray.topology import load_topology, resolve_topology_path
from edgeray.train.moe import MoEError, plan_experts, train_moe
from edgeray.train.sync import prepare_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_moe import add_moe_arguments, config_from

MiB = 1 << 20


def target(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    base = next(r for r in sweep if r["locality_bias"] == 0)
    best = None
    for r in sweep:
        if r["locality_bias"] == 0:
            continue
        cut = 1 - r["inter_region_bytes"] / base["inter_region_bytes"]
        rel = r["val_loss"] / base["val_loss"] - 1
        r["bytes_cut"], r["val_loss_vs_unbiased"] = cut, rel
        if cut >= 0.5 and rel <= 0.02 and (best is None or cut > best["bytes_cut"]):
            best = r
    return {
        "target": "a locality bias cuts inter-region dispatch bytes by >= 50% with val loss within 2% of bias 0",
        "met": best is not None,
        "value": (
            f"bias {best['locality_bias']:g}: {best['bytes_cut']:.0%} fewer bytes, val loss {best['val_loss_vs_unbiased']:+.2%}"
            if best
            else "no bias in the sweep does both"
        ),
    }


def table(sweep: list[dict[str, Any]]) -> str:
    lines = [
        f"{'bias':>6} {'inter-region MiB':>17} {'cut':>6} {'val loss':>9} {'vs 0':>7} {'dropped':>8}  expert load"
    ]
    for r in sweep:
        cut = f"{r.get('bytes_cut', 0):.0%}"
        rel = f"{r.get('val_loss_vs_unbiased', 0):+.2%}"
        load = " ".join(f"{x:.2f}" for x in r["expert_load"])
        lines.append(
            f"{r['locality_bias']:>6g} {r['inter_region_bytes'] / MiB:>17.1f} {cut:>6} {r['val_loss']:>9.4f} {rel:>7} "
            f"{r['dropped_tokens']:>8}  {load}"
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = summary["sweep"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot([r["inter_region_bytes"] / MiB for r in sweep], [r["val_loss"] for r in sweep], marker="o")
    for r in sweep:
        ax.annotate(
            f"bias {r['locality_bias']:g}", (r["inter_region_bytes"] / MiB, r["val_loss"]), fontsize=8
        )
    ax.set_xlabel("inter-region dispatch bytes (MiB)")
    ax.set_ylabel("validation loss")
    ax.set_title("locality bias: bytes vs quality")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bytes_vs_loss.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    experts = len(sweep[0]["expert_load"])
    width = 0.8 / len(sweep)
    for i, r in enumerate(sweep):
        ax.bar(
            [e + i * width for e in range(experts)],
            r["expert_load"],
            width,
            label=f"bias {r['locality_bias']:g}",
        )
    ax.set_xticks([e + 0.4 - width / 2 for e in range(experts)])
    ax.set_xticklabels([f"{e}\n{n}" for e, n in enumerate(summary["expert_nodes"])], fontsize=7)
    ax.set_ylabel("share of assignments")
    ax.set_title("expert load")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "expert_load.png", dpi=110)
    plt.close(fig)
    return [str(out / "bytes_vs_loss.png"), str(out / "expert_load.png")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/moe")
    p.add_argument("--quick", action="store_true", help="a small sweep (CI-sized)")
    p.add_argument(
        "--biases", default="0,0.5,1,2,4,8", help="comma-separated locality bias values (0 included)"
    )
    add_moe_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.seq_len, args.biases = 8, 4, 32, "0,2,8"
    try:
        biases = sorted({0.0, *(float(b) for b in args.biases.split(","))})
    except ValueError:
        p.error(f"--biases {args.biases!r}: expected comma-separated numbers")
    topology = load_topology(resolve_topology_path(args.topology))
    trunk = args.trunk or next(iter(topology.nodes))
    nodes = args.expert_nodes.split(",") if args.expert_nodes else None
    try:
        configs = [config_from(args, b) for b in biases]
        plan = plan_experts(topology, args.experts, trunk, nodes, args.replicas, configs[0].torch_threads)
    except MoEError as exc:
        p.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(topology, out / "data", seq_len=args.seq_len)
    summary: dict[str, Any] = {
        "topology": str(topology.path),
        "steps": args.steps,
        "expert_nodes": list(plan.nodes),
        "sweep": [],
    }
    with cluster.driver(topology, name=f"bench-moe-{os.getpid()}"):
        for config in configs:
            print(f"== locality bias {config.locality_bias:g}", flush=True)
            r = train_moe(
                config,
                topology,
                data_dir=data,
                out=out / "runs" / f"bias-{config.locality_bias:g}",
                steps=args.steps,
                trunk=trunk,
                expert_nodes=nodes,
                checkpoint_every=0,
                progress=lambda m: print(m, flush=True),
            )
            summary["sweep"].append(
                {
                    "locality_bias": config.locality_bias,
                    "inter_region_bytes": r["inter_region_bytes"],
                    "val_loss": r["final_val_loss"],
                    "dropped_tokens": r["dropped_tokens"],
                    "fallback_tokens": r["fallback_tokens"],
                    "expert_load": r["expert_load"],
                }
            )
            write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    summary["target"] = target(summary["sweep"])
    summary["plots"] = plot(summary, out)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    print("\n" + table(summary["sweep"]))
    t = summary["target"]
    print(f"\n[{'MET' if t['met'] else 'NOT MET'}] {t['target']}: {t['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark how one region's two nodes split a model: unsplit on one node, a tensor split (Megatron-style,
degree 2) and a layer split (a 2-stage 1F1B pipeline), with measured and modelled step time, and the
partition planner's choice (edgeray.train.partition) beside the best measured plan.

    python jobs/bench_partition.py --out results/partition [--quick] [--topology clusters/local.yaml]

For each preset (tiny, small) and each link variant of the first region (``--region``; as declared; its nodes' LAN
starved to ``--starved-mbps``, default 50 Mbit/s), trains ``--steps`` steps of the same batches (the first
node's shard, batch ``--batch`` x ``--seq-len``) under every plan and reports per step: measured wall
time (this machine: the two ranks or stages share its cores; links emulated in real time, ``--time-scale``
1), modelled time (the fabric's one clock: each actor's measured compute x its node's slowdown, every
message by the link model), the planner's modelled time (from a compute profile measured before the
cluster starts), bytes between the two nodes, a tensor-parallel rank's seconds inside its all-reduces,
and the final loss (the plans train the same model on the same batches, so their losses agree).
Unsplit runs with one thread (one node's compute: what the planner models) and with two (the same CPUs the
split plans use; a reference for this machine, not a plan of one-thread nodes).
Per preset and link variant: the planner's choice among unsplit (1 thread), tensor and layer split, its
measured time, and the best measured of those three. Writes DIR/summary.json, DIR/plan.txt (the planner's
tables), DIR/partition.png and prints tables.

Measured here: the ranks of a split share this machine's 2 cores, so the measured ratio is what these
cores give, not what two separate boxes would; the modelled ratio charges each node its own compute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import yaml

from edgeray import cluster
from edgeray.atomic import write_atomic
from edgeray.fabric.groups import RunGroups
from edgeray.fabric.ledger import Ledger
from edgeray.model import train_tokenizer
from edgeray.model.presets import PRESETS
from edgeray.model.shards import build_shards, read_shard
from edgeray.placement import reserve
from edgeray.topology import Topology, load_topology, resolve_topology_path
from edgeray.train.partition import ComputeProfile, Partitioner, choose_partition
from edgeray.train.pipeline import PipelineConfig, StageWorker
from edgeray.train.run import train
from edgeray.train.tensor_parallel import TensorParallel

WAIT_S = 600.0
PLANNED = {  # the bench's plans the planner chooses among -> its alternative's name (node 0 formatted in)
    "unsplit (1 thread)": "unsplit on {}",
    "tensor split x2": "tensor split x2",
    "layer split x2 (1F1B)": "layer split x2",
}
MIXED = {  # with --mixed: a third node, of the nearest other region
    "layer split x3 (1F1B)": "layer split x3",
    "mixed (tensor x2 | 1 node)": "mixed (tensor x2 | 1 node)",
}
PLANS = (
    "unsplit (1 thread)",
    "unsplit (2 threads)",
    "tensor split x2",
    "layer split x2 (1F1B)",
)


def starved(topology: Topology, region: str, mbps: float, out: Path) -> Topology:
    """The topology with every node of ``region`` on a ``mbps`` LAN (a file next to the results)."""
    assert topology.path is not None
    spec = yaml.safe_load(Path(topology.path).read_text())
    for r in spec["regions"]:
        if r["name"] == region:
            for n in r["nodes"]:
                n["bandwidth_mbps"] = mbps
    path = out / f"{topology.name}-{region}-{mbps:g}mbps.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_topology(path)


def tensor_plan(
    topology: Topology,
    nodes: list[str],
    preset: str,
    batches: list[np.ndarray],
    threads: int,
    time_scale: float,
) -> dict[str, Any]:
    """Unsplit (one node) or a tensor split over ``nodes``: the first batch warms up, the rest are timed."""
    with TensorParallel(topology, nodes, preset=preset, torch_threads=threads, time_scale=time_scale) as tp:
        clock = tp.train_step(batches[0])["clock"]  # warm-up: not timed
        tp.rows()
        walls, losses, clocks, in_allreduce = [], [], [], []
        for batch in batches[1:]:
            t0 = time.perf_counter()
            r = tp.train_step(batch)
            walls.append(time.perf_counter() - t0)
            losses.append(r["loss"])
            clocks.append(r["clock"])
            in_allreduce.append(float(np.mean(r["rank_allreduce_wall_s"])))
        rows = tp.rows()
    return {
        "walls": walls,
        "losses": losses,
        "clocks": [clock, *clocks],
        "rows": rows,
        "allreduce_s": in_allreduce,
    }


def layer_plan(
    topology: Topology,
    nodes: list[str],
    preset: str,
    boundaries: tuple[int, ...],
    data: Path,
    steps: int,
    batch: int,
    threads: int,
    time_scale: float,
    microbatches: int,
) -> dict[str, Any]:
    with RunGroups("bench-partition") as groups:
        config = PipelineConfig(
            preset=preset, boundaries=boundaries, microbatches=microbatches,
            micro_batch_size=batch // microbatches,
            group_prefix=groups.prefix, torch_threads=threads, time_scale=time_scale,
        )  # fmt: skip
        with reserve([(n, threads) for n in nodes], what=f"bench-partition {groups.prefix}") as held:
            workers = [
                held.pin(StageWorker, i).remote(config, i, str(topology.path), n, str(data))
                for i, n in enumerate(nodes)
            ]
            ray.get([w.join.remote() for w in workers], timeout=WAIT_S)
            clock, walls, losses = 0.0, [], []
            clocks: list[float] = []
            rows: list[dict[str, Any]] = []
            for step in range(steps + 1):
                t0 = time.perf_counter()
                res = ray.get([w.train_step.remote(step, clock=clock) for w in workers], timeout=WAIT_S)
                wall = time.perf_counter() - t0
                clock = max(r["clock_s"] for r in res)
                step_rows = Ledger.merge(
                    ray.get([w.ledger_rows.remote() for w in workers], timeout=WAIT_S)
                ).rows()
                clocks.append(clock)
                if step > 0:  # the first step warms up
                    walls.append(wall)
                    losses.append(res[-1]["loss"])
                    rows += step_rows
            for w in workers:
                ray.kill(w, no_restart=True)
    return {"walls": walls, "losses": losses, "clocks": clocks, "rows": rows}


def train_plan(
    topology: Topology, alt: Any, preset: str, profile: ComputeProfile, args: Any, out: Path
) -> dict[str, Any]:
    """A layer split or mixed plan as edgeray.train.run.train runs it (the partitioner's layout of ``alt``);
    the first step warms up."""
    partitioner = Partitioner(
        topology, alt.nodes, preset, args.batch, args.seq_len, args.microbatches, profile
    )
    plan, config = partitioner.layout(
        alt,
        PipelineConfig(
            preset=preset, microbatches=args.microbatches, micro_batch_size=args.batch // args.microbatches,
            time_scale=args.time_scale,
        ),
    )  # fmt: skip
    train(
        topology, plan, config, out=out, steps=args.steps + 1, seq_len=args.seq_len, progress=lambda _: None
    )
    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    return {
        "walls": [r["wall_s"] for r in metrics[1:]],
        "losses": [r["loss"] for r in metrics[1:]],
        "clocks": [r["modelled_s"] for r in metrics],
        "rows": [r for r in ledger if r["step"] > 0],
    }


def summarise(name: str, r: dict[str, Any], steps: int) -> dict[str, Any]:
    between = sum(row["bytes"] for row in r["rows"] if row["src"] != row["dst"])
    return {
        "plan": name,
        "measured_step_s": float(np.median(r["walls"])),
        "modelled_step_s": (r["clocks"][-1] - r["clocks"][0]) / steps,
        "bytes_per_step": between // steps,
        "final_loss": r["losses"][-1],
        # a rank's wall seconds per step inside the all-reduces, waiting for its peer included
        "allreduce_s": float(np.median(r["allreduce_s"])) if "allreduce_s" in r else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="local")
    p.add_argument("--out", default="results/partition")
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--steps", type=int, default=5, help="timed steps per plan (after one warm-up step)")
    p.add_argument(
        "--batch", type=int, default=16, help="sequences per step (--microbatches in the pipeline)"
    )
    p.add_argument(
        "--microbatches",
        type=int,
        default=4,
        help="micro-batches of the layer split's 1F1B (1: a relay, one stage idle at a time)",
    )
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--starved-mbps", type=float, default=50.0)
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="link emulation in real time x this (1: measured times include the links; 0: account only)",
    )
    p.add_argument(
        "--region", default=None, help="the region whose first two nodes are used (default: the first)"
    )
    p.add_argument(
        "--mixed",
        action="store_true",
        help="add the nearest node of another region and two plans over the three nodes: a 3-stage layer "
        "split and a 2-stage pipeline whose first stage is the region's tensor split",
    )
    p.add_argument("--quick", action="store_true", help="tiny only, 2 steps of 8 x 32 tokens (CI-sized)")
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.steps, args.batch, args.seq_len = "tiny", 2, 8, 32
    presets = args.presets.split(",")
    bad = [x for x in presets if x not in PRESETS]
    if bad:
        p.error(f"--presets: unknown {bad}; valid: {sorted(PRESETS)}")
    if args.batch % args.microbatches:
        p.error(f"--batch {args.batch}: must be a multiple of --microbatches {args.microbatches}")
    topology = load_topology(resolve_topology_path(args.topology))
    if args.region is not None and args.region not in topology.regions:
        p.error(f"--region {args.region!r}: regions of {topology.name} are {sorted(topology.regions)}")
    region = topology.regions[args.region] if args.region else next(iter(topology.regions.values()))
    if len(region.nodes) < 2:
        p.error(f"region {region.name} of {topology.name} has {len(region.nodes)} node; a split needs 2")
    nodes = [n.name for n in region.nodes[:2]]
    third = None
    if args.mixed:  # the node of another region nearest to the first node
        others = [n.name for n in topology.iter_nodes() if n.region != region.name]
        third = min(others, key=lambda n: (topology.path_latency_ms(nodes[0], n), n))
    planned = dict(PLANNED) | (MIXED if third else {})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    build_shards(topology, train_tokenizer(), data, seq_len=args.seq_len, nodes=nodes[:1])
    shard = read_shard(data, nodes[0]).numpy()
    batches = [
        shard[[(step * args.batch + i) % len(shard) for i in range(args.batch)]]
        for step in range(args.steps + 1)
    ]  # PipelineConfig.batch_rows: every plan trains on the same rows
    variants = {
        "declared": topology,
        f"{args.starved_mbps:g} Mbit/s LAN": starved(topology, region.name, args.starved_mbps, out),
    }
    rows: list[dict[str, Any]] = []
    decisions: list[dict[str, Any]] = []
    profiles = {}
    for preset in presets:  # before the cluster starts: this process alone on the machine
        print(f"== profiling {preset} ({args.batch} x {args.seq_len} tokens, 1 thread)", flush=True)
        profiles[preset] = ComputeProfile.measure(
            preset, rows=args.batch, seq_len=args.seq_len, degrees=(1, 2)
        )
    with cluster.driver(topology, name=f"bench-partition-{os.getpid()}"):
        for preset in presets:
            for variant, topo in variants.items():
                choice = choose_partition(
                    topo, nodes + ([third] if third else []), preset=preset, rows=args.batch, seq_len=args.seq_len,
                    microbatches=args.microbatches, profile=profiles[preset],
                    kinds=("unsplit", "layer", "tensor", "mixed") if third else ("unsplit", "layer", "tensor"),
                )  # fmt: skip
                with (out / "plan.txt").open("a") as f:
                    f.write(f"== {preset}, links {variant}\n{choice.table()}\n\n")
                print(choice.table(), flush=True)
                measured: dict[str, float] = {}
                for name in (*PLANS, *(MIXED if third else ())):
                    if variant != "declared" and name.startswith("unsplit"):
                        # one node: no link to starve; the declared run's time stands for it
                        same = next(r for r in rows if r["preset"] == preset and r["plan"] == name)
                        measured[name] = same["measured_step_s"]
                        continue
                    print(f"== {preset}, {variant}: {name}", flush=True)
                    if name in MIXED:
                        r = train_plan(
                            topo, choice.get(MIXED[name]), preset, profiles[preset], args,
                            out / "runs" / f"{preset}-{variant.split()[0]}-{MIXED[name].split()[0]}",
                        )  # fmt: skip
                    elif name == "layer split x2 (1F1B)":
                        bounds = choice.get("layer split x2").boundaries
                        r = layer_plan(
                            topo,
                            nodes,
                            preset,
                            bounds,
                            data,
                            args.steps,
                            args.batch,
                            1,
                            args.time_scale,
                            args.microbatches,
                        )
                    else:
                        use = nodes if name == "tensor split x2" else nodes[:1]
                        r = tensor_plan(
                            topo, use, preset, batches, 2 if "2 threads" in name else 1, args.time_scale
                        )
                    row = {"preset": preset, "links": variant, **summarise(name, r, args.steps)}
                    alt = planned.get(name)
                    row["planner_modelled_s"] = choice.get(alt.format(nodes[0])).modelled_s if alt else None
                    rows.append(row)
                    measured[name] = row["measured_step_s"]
                    write_atomic(out / "summary.json", json.dumps({"rows": rows}, indent=2))
                assert choice.best is not None
                # unsplit on any node: the run on the first (the local preset's nodes compute alike)
                chosen = next(
                    n for n, alt in planned.items()
                    if alt.format(nodes[0]) == choice.best.name or (alt.startswith("unsplit") and choice.best.kind == "unsplit")
                )  # fmt: skip
                best = min(planned, key=lambda n: measured[n])
                decisions.append(
                    {
                        "preset": preset,
                        "links": variant,
                        "planner_choice": chosen,
                        "planner_modelled_s": choice.best.modelled_s,
                        "choice_measured_s": measured[chosen],
                        "best_measured": best,
                        "best_measured_s": measured[best],
                        "choice_vs_best": measured[chosen] / measured[best],
                        "within_10pct": measured[chosen] <= 1.1 * measured[best],
                    }
                )
    summary = {
        "topology": str(topology.path),
        "nodes": nodes + ([third] if third else []),
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "time_scale": args.time_scale,
        "microbatches": args.microbatches,
        "rows": rows,
        "decisions": decisions,
    }
    summary["plot"] = plot(rows, out)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    print(table(rows))
    print()
    print(decision_table(decisions))
    print(f"\nwrote {out / 'summary.json'}, {summary['plot']}")
    return 0


def decision_table(decisions: list[dict[str, Any]]) -> str:
    lines = [
        f"{'preset':6} {'links':18} {'planner chose':28} {'measured s':>10} {'best measured':28} "
        f"{'measured s':>10} {'ratio':>6} within 10%"
    ]
    for d in decisions:
        lines.append(
            f"{d['preset']:6} {d['links']:18} {d['planner_choice']:28} {d['choice_measured_s']:10.3f} "
            f"{d['best_measured']:28} {d['best_measured_s']:10.3f} {d['choice_vs_best']:6.2f} {d['within_10pct']}"
        )
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'preset':6} {'links':18} {'plan':30} {'measured s':>10} {'x unsplit':>9} {'modelled s':>10} {'x unsplit':>9} {'planner s':>9} {'KiB/step':>9} {'loss':>7}"
    lines = [head]
    for r in rows:
        base = next(b for b in rows if b["preset"] == r["preset"] and b["plan"] == PLANS[0])
        planned = "-" if r.get("planner_modelled_s") is None else f"{r['planner_modelled_s']:.3f}"
        lines.append(
            f"{r['preset']:6} {r['links']:18} {r['plan']:30} {r['measured_step_s']:10.3f} "
            f"{r['measured_step_s'] / base['measured_step_s']:9.2f} {r['modelled_step_s']:10.3f} "
            f"{r['modelled_step_s'] / base['modelled_step_s']:9.2f} {planned:>9} {r['bytes_per_step'] / 1024:9.0f} {r['final_loss']:7.4f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(7 * len(presets), 4.5), squeeze=False)
    for ax, preset in zip(axes[0], presets, strict=True):
        mine = [r for r in rows if r["preset"] == preset]
        labels = [f"{r['plan']}\n{r['links']}" for r in mine]
        x = np.arange(len(mine))
        ax.bar(x - 0.2, [r["measured_step_s"] for r in mine], 0.4, label="measured (this machine)")
        ax.bar(x + 0.2, [r["modelled_step_s"] for r in mine], 0.4, label="modelled (fabric clock)")
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("seconds per step")
        ax.set_title(f"{preset}: one region's two nodes")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "partition.png"
    fig.savefig(path, dpi=110)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())

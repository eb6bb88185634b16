"""Train the tiny Llama pipeline-parallel across the edge fleet.

    python jobs/train_pipeline.py --topology clusters/local.yaml --steps 40 --out runs/pipe
    eval "$(edgeray env)"; ray job submit --working-dir . -- python jobs/train_pipeline.py --out /tmp/pipe

Plans the stages (stage 0 on the data node, then the nearest nodes; layers by CPUs; memory checked),
trains with GPipe or 1F1B over the fabric, and writes the run directory described in edgeray.train.run.
Without a cluster it starts one for the topology and tears it down afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from edgeray import cluster
from edgeray.topology import Tier, load_topology, resolve_topology_path
from edgeray.train.pipeline import PipelineConfig
from edgeray.train.planner import plan_pipeline, plan_replicas
from edgeray.train.run import tp_nodes, train


def auto_partitioner(topology: Any, args: argparse.Namespace) -> Any:
    """The partition planner for the data node's region (data node first), with a compute profile measured
    here."""
    from edgeray.train.partition import ComputeProfile, Partitioner

    data_node = topology.node(args.data_node).name if args.data_node else next(topology.iter_nodes()).name
    region = topology.regions[topology.nodes[data_node].region]
    nodes = [data_node] + [n.name for n in region.nodes if n.name != data_node]
    rows = args.microbatches * args.micro_batch_size
    print(
        f"profiling {args.preset} on this machine ({rows} x {args.seq_len} tokens, 1 thread) ...", flush=True
    )
    profile = ComputeProfile.measure(args.preset, rows=rows, seq_len=args.seq_len, repeats=2)
    return Partitioner(
        topology, tuple(nodes), args.preset, rows, args.seq_len, args.microbatches, profile,
        prefer=args.prefer, energy_slack=args.energy_slack,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default=os.environ.get("EDGERAY_TOPOLOGY") or "local")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="runs/pipeline")
    p.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument(
        "--extra-warmup", type=int, default=1, help="1F1B: extra warm-up forwards that hide message latency"
    )
    p.add_argument(
        "--recv-ahead",
        type=int,
        default=2,
        help="receives posted ahead per neighbour stage, so transfers overlap compute (0 = on use)",
    )
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--replicas", type=int, default=1, help="data-parallel pipelines, one per region first")
    p.add_argument(
        "--data-node", default=None, help="node whose shard stage 0 reads (default: the first node)"
    )
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--time-scale", type=float, default=0.0, help="link emulation in real time x this (0 = account)"
    )
    p.add_argument(
        "--int8-tiers",
        default="device",
        help="comma-separated tiers whose stages hold frozen int8 weights ('none': every stage fp32)",
    )
    p.add_argument(
        "--tp",
        default=None,
        help="tensor-parallel degree of each stage, comma-separated (e.g. 2,1,1): stage k also runs on the "
        "next free nodes of its region (edgeray.train.tensor_parallel)",
    )
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument(
        "--replan-every",
        type=int,
        default=0,
        help="every N steps, re-plan from the links' measured speed and move stages if it pays (0 = never)",
    )
    p.add_argument(
        "--actual-topology",
        default=None,
        help="emulate links from this topology file instead of --topology (a network that differs from "
        "its description; use with --time-scale 1 and --replan-every)",
    )
    p.add_argument(
        "--partition",
        choices=["stages", "auto"],
        default="stages",
        help="stages: --stages stages chained from the data node (--tp per stage); auto: the partition "
        "planner chooses how the data node's region runs the model (unsplit, layer split or tensor split, "
        "by modelled step time from a compute profile measured here and the declared links, fp32; plan.txt "
        "explains the choice); with --replan-every N it re-partitions through a checkpoint when the "
        "measured links make another layout >= 1.25x faster",
    )
    p.add_argument(
        "--prefer",
        choices=["time", "energy"],
        default="time",
        help="--partition auto: the fastest layout, or the one of fewest modelled joules per step (the "
        "topology's idle_w / busy_w) among those within --energy-slack of the fastest",
    )
    p.add_argument(
        "--energy-slack", type=float, default=1.10, help="--prefer energy: a factor on the fastest step"
    )
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    if args.prefer != "time" and args.partition != "auto":
        p.error("--prefer energy chooses among the partition planner's layouts: add --partition auto")
    topology = load_topology(resolve_topology_path(args.topology))
    tiers = frozenset() if args.int8_tiers == "none" else frozenset(args.int8_tiers.split(","))
    valid = {t.value for t in Tier}
    if tiers - valid:
        p.error(
            f"--int8-tiers {args.int8_tiers!r}: unknown tier(s) {sorted(tiers - valid)}; valid: {sorted(valid)}"
        )
    sizes = {
        "micro_batch_size": args.micro_batch_size,
        "seq_len": args.seq_len,
        "microbatches": args.microbatches,
        "int8_tiers": tiers,
        "schedule": args.schedule,
        "extra_warmup": args.extra_warmup,
    }
    explain, partitioner = "", None
    if args.partition == "auto":
        if args.replicas > 1 or args.tp:
            p.error("--partition auto: choose --replicas and --tp yourself, or let the planner choose")
        partitioner = auto_partitioner(topology, args)
        choice = partitioner.choose()
        explain = choice.table()
        print(explain, flush=True)
        best = choice.best
        assert best is not None
        nodes = list(best.nodes) if best.kind == "layer" else list(best.nodes[:1])
        plans = [
            plan_pipeline(topology, preset=args.preset, nodes=nodes, **{**sizes, "int8_tiers": frozenset()})
        ]
        args.tp = str(best.degree) if best.kind == "tensor" else None
    elif args.replicas > 1:
        plans = plan_replicas(
            topology, replicas=args.replicas, stages=args.stages, preset=args.preset, **sizes
        )
    else:
        plans = [
            plan_pipeline(topology, preset=args.preset, stages=args.stages, data_node=args.data_node, **sizes)
        ]
    for r, plan in enumerate(plans):
        print(f"replica {r}:\n{plan.table()}", flush=True)
    try:
        tp = tuple(int(d) for d in args.tp.split(",")) if args.tp else ()
        config = PipelineConfig(
            preset=args.preset,
            boundaries=plans[0].boundaries,
            schedule=args.schedule,
            extra_warmup=args.extra_warmup,
            recv_ahead=args.recv_ahead,
            microbatches=args.microbatches,
            micro_batch_size=args.micro_batch_size,
            lr=args.lr,
            time_scale=args.time_scale,
            replicas=args.replicas,
            # stage k is int8 in every replica if it is in one: replicas must hold identical weights
            int8_stages=tuple(sorted({i for plan in plans for i in plan.int8_stages})),
            actual_topology=str(resolve_topology_path(args.actual_topology))
            if args.actual_topology
            else None,
            tp=tp,
        )
        tp_nodes(topology, plans, config)  # a stage's region without free nodes for its peers: refused here
    except ValueError as exc:
        p.error(f"--tp {args.tp}: {exc}" if args.tp else str(exc))
    with cluster.driver(topology, name=f"train-{os.getpid()}"):
        summary = train(
            topology,
            plans,
            config,
            out=args.out,
            steps=args.steps,
            seq_len=args.seq_len,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            replan_every=args.replan_every,
            progress=lambda m: print(m, flush=True),
            explain=explain,
            partitioner=partitioner,
        )
    print(
        f"loss {summary['initial_loss']:.3f} -> {summary['final_loss']:.3f} (val {summary['val_loss']:.3f}); "
        f"bubble {summary['bubble_fraction']:.2f}, busiest stage {summary['bottleneck_bubble']:.2f} "
        f"(theory {summary['theoretical_bubble']:.2f}); "
        f"{summary['tokens_per_s']:.0f} tok/s; checkpoint {summary['checkpoint']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

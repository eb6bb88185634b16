"""Train the tiny Mixture-of-Experts Llama with its experts spread over the edge fleet.

    python jobs/train_moe.py --topology clusters/local.yaml --out runs/moe [--locality-bias 2]
    eval "$(edgeray env)"; ray job submit --working-dir . -- python jobs/train_moe.py --out /tmp/moe

The trunk (embeddings, attention, routers, LM head) runs on the data node; each expert is an actor on the
node the expert plan gives it (spread over regions, nearest first). Token hidden states and their
gradients cross the fabric. Writes OUT/plan.txt, metrics.parquet, ledger.parquet, summary.json
(final_val_loss, inter_region_bytes, expert_load, dropped_tokens, ...) and checkpoint/ (a Mixtral-format
Hugging Face directory plus optimizer states). ``--kill-expert STEP:EXPERT`` kills an expert's actor before
that step: training restarts from the last checkpoint. Without a cluster it starts one and tears it down.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edgeray import cluster
from edgeray.topology import load_topology, resolve_topology_path
from edgeray.train.moe import OVERFLOW, MoEConfig, MoEError, plan_experts, train_moe
from edgeray.train.sync import prepare_data


def add_moe_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared with bench_moe.py."""
    p.add_argument("--topology", default=os.environ.get("EDGERAY_TOPOLOGY") or "local")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--experts", type=int, default=6)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--replicas", type=int, default=1, help="actors per expert (standbys on other nodes)")
    p.add_argument("--capacity-factor", type=float, default=2.0)
    p.add_argument("--overflow", choices=OVERFLOW, default="drop")
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--trunk", default=None, help="the data node, where the trunk runs (default: the first node)"
    )
    p.add_argument("--expert-nodes", default=None, help="comma-separated nodes that may host experts")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)


def config_from(args: argparse.Namespace, locality_bias: float) -> MoEConfig:
    return MoEConfig(
        experts=args.experts,
        top_k=args.top_k,
        replicas=args.replicas,
        capacity_factor=args.capacity_factor,
        overflow=args.overflow,
        locality_bias=locality_bias,
        aux_loss_coef=args.aux_loss_coef,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/moe")
    p.add_argument("--data", default=None, help="shard directory (default: OUT/data)")
    p.add_argument("--locality-bias", type=float, default=0.0)
    p.add_argument("--kill-expert", default=None, metavar="STEP:EXPERT", help="failure drill")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from its last checkpoint (same arguments; --steps may grow)",
    )
    add_moe_arguments(p)
    args = p.parse_args(argv)
    topology = load_topology(resolve_topology_path(args.topology))
    nodes = args.expert_nodes.split(",") if args.expert_nodes else None
    trunk = args.trunk or next(iter(topology.nodes))
    try:
        config = config_from(args, args.locality_bias)
        plan_experts(
            topology, config.experts, trunk, nodes, config.replicas, config.torch_threads
        )  # refuse a bad plan up front
        kill = tuple(int(v) for v in args.kill_expert.split(":")) if args.kill_expert else None
        if kill is not None and (len(kill) != 2 or not 0 <= kill[1] < config.experts):
            raise MoEError(
                f"--kill-expert {args.kill_expert!r}: expected STEP:EXPERT with EXPERT in 0..{config.experts - 1}"
            )
    except (MoEError, ValueError) as exc:
        p.error(str(exc))
    data = prepare_data(topology, args.data or Path(args.out) / "data", seq_len=args.seq_len)
    with cluster.driver(topology, name=f"moe-{os.getpid()}"):
        try:
            train_moe(
                config,
                topology,
                data_dir=data,
                out=args.out,
                steps=args.steps,
                trunk=trunk,
                expert_nodes=nodes,
                checkpoint_every=args.checkpoint_every,
                kill_expert_at=kill,  # type: ignore[arg-type]
                resume=args.resume,
                progress=lambda m: print(m, flush=True),
            )
        except MoEError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the tiny Llama data-parallel across the edge fleet with one sync strategy.

    python jobs/train_sync.py --strategy diloco --topology clusters/local.yaml --out runs/diloco
    eval "$(edgeray env)"; ray job submit --working-dir . -- python jobs/train_sync.py --strategy gossip --out /tmp/g

Strategies: sync, sync-hier, async, ssp, easgd, gossip, diloco (see edgeray.train.sync). Stragglers come from
the topology's node ``slowdown`` or ``--slow NODE=FACTOR``; churn from ``--churn NODE@LEAVE[-JOIN]``
(modelled seconds) or ``--churn mtbf:SPEEDUP`` (sampled from the topology's availability / MTBF, time
compressed SPEEDUP times). Writes OUT/metrics.parquet, ledger.parquet, summary.json, checkpoint/.
Without a cluster it starts one for the topology and tears it down afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edgeray import cluster
from edgeray.topology import load_topology, resolve_topology_path
from edgeray.train.sync import (
    STRATEGIES,
    ChurnEvent,
    SyncConfig,
    SyncError,
    check_run,
    churn_from_topology,
    prepare_data,
    run_sync,
)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared with compare_sync.py."""
    p.add_argument("--topology", default=os.environ.get("EDGERAY_TOPOLOGY") or "local")
    p.add_argument("--steps", type=int, default=40, help="token budget, in synchronous steps of every worker")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per worker step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument(
        "--compute-s", type=float, default=0.25, help="modelled seconds per step on a reference node"
    )
    p.add_argument(
        "--slow", action="append", default=[], metavar="NODE=FACTOR", help="straggler (repeatable)"
    )
    p.add_argument("--churn", action="append", default=[], metavar="NODE@LEAVE[-JOIN] | mtbf:SPEEDUP")
    p.add_argument("--staleness", type=int, default=None, help="async: drop gradients older than this")
    p.add_argument(
        "--no-staleness-lr", action="store_true", help="async/ssp: do not divide the lr by the staleness"
    )
    p.add_argument("--ssp-bound", type=int, default=3)
    p.add_argument("--easgd-alpha", type=float, default=0.15)
    p.add_argument("--easgd-period", type=int, default=4)
    p.add_argument("--diloco-h", type=int, default=20)
    p.add_argument("--diloco-fixed", action="store_true", help="every region runs H inner steps (no fitting)")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--codec", default="none", help="codec on DiLoCo's / sync-hier's inter-region hops")
    p.add_argument("--non-iid", action="store_true", help="regions see different documents")
    p.add_argument("--nodes", default=None, help="comma-separated worker nodes (default: every node)")
    p.add_argument("--server-node", default=None, help="parameter server node (default: the most central)")
    p.add_argument("--seed", type=int, default=0)


def parse_slow(items: list[str], p: argparse.ArgumentParser) -> dict[str, float]:
    out = {}
    for item in items:
        node, _, factor = item.partition("=")
        try:
            out[node] = float(factor)
        except ValueError:
            p.error(f"--slow {item!r}: expected NODE=FACTOR, e.g. campus-jetson=5")
    return out


def parse_churn(
    items: list[str], topology, nodes: list[str], horizon_s: float, seed: int
) -> list[ChurnEvent]:
    events: list[ChurnEvent] = []
    for item in items:
        if item.startswith("mtbf:"):
            speedup = float(item.split(":", 1)[1])
            events += churn_from_topology(topology, nodes, horizon_s=horizon_s, speedup=speedup, seed=seed)
        else:
            events.append(ChurnEvent.parse(item))
    return events


def config_from(args: argparse.Namespace, strategy: str, p: argparse.ArgumentParser) -> SyncConfig:
    return SyncConfig(
        strategy=strategy,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        compute_s=args.compute_s,
        slowdown=parse_slow(args.slow, p),
        staleness=args.staleness,
        staleness_lr=not args.no_staleness_lr,
        ssp_bound=args.ssp_bound,
        easgd_alpha=args.easgd_alpha,
        easgd_period=args.easgd_period,
        diloco_h=args.diloco_h,
        diloco_fit=not args.diloco_fixed,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
        codec=args.codec,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", choices=STRATEGIES, required=True)
    p.add_argument("--out", default="runs/sync")
    p.add_argument("--data", default=None, help="shard directory (default: OUT/data)")
    add_run_arguments(p)
    args = p.parse_args(argv)
    topology = load_topology(resolve_topology_path(args.topology))
    try:
        config = config_from(args, args.strategy, p)
        nodes = args.nodes.split(",") if args.nodes else list(topology.nodes)
        horizon = args.steps * args.compute_s * 20
        churn = parse_churn(args.churn, topology, nodes, horizon, args.seed)
        check_run(config, topology, nodes, churn, args.server_node)
    except (SyncError, ValueError) as exc:
        p.error(str(exc))
    data = prepare_data(
        topology, args.data or Path(args.out) / "data", seq_len=args.seq_len, non_iid=args.non_iid
    )
    with cluster.driver(topology, name=f"sync-{os.getpid()}"):
        try:
            run_sync(
                config,
                topology,
                data_dir=data,
                out=args.out,
                nodes=nodes,
                server_node=args.server_node,
                churn=churn,
                progress=lambda m: print(m, flush=True),
            )
        except SyncError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

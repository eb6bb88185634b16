"""Train the tiny Llama data-parallel across the edge fleet with one sync strategy.

    python jobs/train_sync.py --strategy diloco --topology clusters/local.yaml --out runs/diloco
    eval "$(edgeray env)"; ray job submit --working-dir . -- python jobs/train_sync.py --strategy gossip --out /tmp/g

Strategies: sync, sync-hier, async, ssp, easgd, gossip, diloco, streaming-diloco (edgeray.train.strategies;
their hyperparameters with --param NAME=VALUE or the shorthand flags). Stragglers come from
the topology's node ``slowdown`` or ``--slow NODE=FACTOR``; churn from ``--churn NODE@LEAVE[-JOIN]``
(modelled seconds) or ``--churn mtbf:SPEEDUP`` (sampled from the topology's availability / MTBF, time
compressed SPEEDUP times). Writes OUT/metrics.parquet, ledger.parquet, summary.json, checkpoint/, and
OUT/resume/ at every evaluation until the run completes: ``--resume`` continues an interrupted run from it.
Without a cluster it starts one for the topology and tears it down afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any

from edgeray import cluster
from edgeray.topology import load_topology, resolve_topology_path
from edgeray.train.strategies import get as get_strategy
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
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a hyperparameter of the strategy, or STRATEGY.NAME=VALUE for one strategy of a comparison "
        "(repeatable; see edgeray/train/strategies/README.md)",
    )
    # Shorthands for hyperparameters (each sets the named one in every strategy that takes it).
    p.add_argument("--staleness", type=int, default=None, help="async: drop gradients older than this")
    p.add_argument(
        "--no-staleness-lr",
        action="store_const",
        const=True,
        default=None,
        help="async/ssp: do not divide the lr by the staleness",
    )
    p.add_argument("--ssp-bound", type=int, default=None, help="ssp: steps ahead of the slowest (3)")
    p.add_argument("--easgd-alpha", type=float, default=None, help="easgd: elasticity (0.15)")
    p.add_argument("--easgd-period", type=int, default=None, help="easgd: local steps between exchanges (4)")
    p.add_argument(
        "--diloco-h", type=int, default=None, help="(streaming) diloco: inner steps per round (20)"
    )
    p.add_argument(
        "--diloco-fixed",
        action="store_const",
        const=True,
        default=None,
        help="diloco: every region runs H inner steps (no fitting)",
    )
    p.add_argument("--outer-lr", type=float, default=None, help="(streaming) diloco: outer lr (0.7)")
    p.add_argument("--outer-momentum", type=float, default=None, help="(streaming) diloco: Nesterov momentum")
    p.add_argument("--codec", default=None, help="codec on the inter-region hops (sync-hier, diloco, ...)")
    p.add_argument("--fragments", type=int, default=None, help="streaming-diloco: model fragments")
    p.add_argument("--non-iid", action="store_true", help="regions see different documents")
    p.add_argument("--nodes", default=None, help="comma-separated worker nodes (default: every node)")
    p.add_argument("--server-node", default=None, help="parameter server node (default: the most central)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="start from this checkpoint (a run's OUT/checkpoint) instead of random weights",
    )
    p.add_argument(
        "--evals",
        type=int,
        default=SyncConfig.evals,
        help=f"validation-loss evaluations over the run, each also a checkpoint ({SyncConfig.evals})",
    )


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


# flag (argparse dest) -> (hyperparameter name, value to use instead of the flag's, if any)
SHORTHANDS: dict[str, tuple[str, Any]] = {
    "staleness": ("staleness", None),
    "no_staleness_lr": ("staleness_lr", False),
    "ssp_bound": ("bound", None),
    "easgd_alpha": ("alpha", None),
    "easgd_period": ("period", None),
    "diloco_h": ("h", None),
    "diloco_fixed": ("fit", False),
    "outer_lr": ("outer_lr", None),
    "outer_momentum": ("outer_momentum", None),
    "codec": ("codec", None),
    "fragments": ("fragments", None),
}


def _typed(cls: type, name: str, text: str) -> Any:
    """``text`` as the type of field ``name`` of dataclass ``cls`` (int, float, bool, str, or X | None)."""
    hint = typing.get_type_hints(cls)[name]
    options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if text.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    kind = options[0]
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name}={text!r}: expected true or false")
        return text.lower() in ("true", "1", "yes")
    return kind(text)


def params_from(args: argparse.Namespace, strategy: str, *, strict: bool = True) -> dict[str, Any]:
    """The strategy's hyperparameters from ``--param NAME=VALUE`` and the shorthand flags. ``strict``: a
    shorthand the strategy does not take is refused by name (compare_sync.py applies each shorthand only to
    the strategies that take it)."""
    cls = get_strategy(strategy).params_type
    known = {f.name for f in dataclasses.fields(cls)}
    params: dict[str, Any] = {}
    for dest, (name, value) in SHORTHANDS.items():
        given = getattr(args, dest, None)
        if given is None:
            continue
        if name not in known:
            if strict:
                flag = "--" + dest.replace("_", "-")
                raise SyncError(
                    f"{flag}: strategy {strategy} takes no {name!r}; it takes {sorted(known) or 'none'}"
                )
            continue
        params[name] = given if value is None else value
    for item in args.param:
        name, sep, text = item.partition("=")
        if not sep:
            raise SyncError(f"--param {item!r}: expected NAME=VALUE or STRATEGY.NAME=VALUE, e.g. h=30")
        scope, dot, name = name.rpartition(".")
        if dot and scope != strategy:
            continue  # scoped to another strategy (compare_sync.py)
        if name not in known:
            if not strict and not dot:
                continue
            raise SyncError(
                f"--param {name}: strategy {strategy} takes {sorted(known) or 'no hyperparameters'}"
            )
        try:
            params[name] = _typed(cls, name, text)
        except ValueError as exc:
            raise SyncError(f"--param {item!r}: {exc}") from None
    return params


def config_from(
    args: argparse.Namespace, strategy: str, p: argparse.ArgumentParser, *, strict: bool = True
) -> SyncConfig:
    return SyncConfig(
        strategy=strategy,
        params=params_from(args, strategy, strict=strict),
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        compute_s=args.compute_s,
        slowdown=parse_slow(args.slow, p),
        seed=args.seed,
        evals=args.evals,
        init_from=args.init_from,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", choices=STRATEGIES, required=True)
    p.add_argument("--out", default="runs/sync")
    p.add_argument("--data", default=None, help="shard directory (default: OUT/data)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in OUT from its last checkpoint (same arguments)",
    )
    add_run_arguments(p)
    args = p.parse_args(argv)
    return run_job(args, args.strategy, p)


def run_job(args: argparse.Namespace, strategy: str, p: argparse.ArgumentParser) -> int:
    """Validate, prepare the shards, and run ``strategy`` on the cluster (started for the topology when
    there is none); the exit status (2: the run could not go on, said on stderr)."""
    topology = load_topology(resolve_topology_path(args.topology))
    try:
        config = config_from(args, strategy, p)
        nodes = args.nodes.split(",") if args.nodes else list(topology.nodes)
        horizon = args.steps * args.compute_s * 20
        churn = parse_churn(args.churn, topology, nodes, horizon, args.seed)
        check_run(config, topology, nodes, churn, args.server_node)
    except (SyncError, ValueError) as exc:
        p.error(str(exc))
    data = prepare_data(
        topology, args.data or Path(args.out) / "data", seq_len=args.seq_len, non_iid=args.non_iid
    )
    with cluster.driver(topology, name=f"{strategy}-{os.getpid()}"):
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
                resume=args.resume,
            )
        except SyncError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

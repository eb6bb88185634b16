"""Federated fine-tuning of the tiny Llama across the edge fleet: every node a client with its own shard,
rounds of sampled clients, optional secure aggregation and client-level differential privacy.

    python jobs/train_federated.py --rounds 20 --sample-rate 0.5 --out runs/fed
    python jobs/train_federated.py --rounds 20 --secagg --clip 0.5 --target-epsilon 8 --out runs/fed-dp
    python jobs/train_federated.py --init-from runs/sync/checkpoint --lora-rank 8 --clients-per-node 50 ...
    eval "$(edgeray env)"; ray job submit --working-dir . -- python jobs/train_federated.py --secagg --clip 1 --out /tmp/f

The strategy is ``federated`` (edgeray/train/strategies/federated.py): FedAvg, FedProx (``--mu``), FedAdam
(``--server-optimizer adam``), Poisson client sampling, virtual clients (``--clients-per-node``), LoRA
adapters (``--lora-rank``) of a checkpoint (``--init-from``), SecAgg+ (``--secagg``, with a dropout drill
``--drop-after-masking``), DP-FedAvg (``--noise-multiplier`` or ``--target-epsilon`` with ``--clip``).
Every other hyperparameter with ``--param NAME=VALUE``; the run options are train_sync.py's (``--topology``,
``--non-iid``, ``--churn``, ``--slow``, ``--nodes``, ``--resume``, ...). Writes OUT/summary.json
(final_val_loss, epsilon, delta, rounds, clients_per_round, dropped, inter_region_bytes, secagg_client_ms,
secagg_server_ms, ...), metrics.parquet (one "round" row per round, with epsilon so far), ledger.parquet,
audit.jsonl (check it with ``edgeray audit verify OUT``) and checkpoint/.
"""

from __future__ import annotations

import argparse
import sys

from train_sync import add_run_arguments, run_job

# flag (argparse dest) -> the strategy's hyperparameter
FLAGS = {
    "sample_rate": "sample_rate",
    "local_steps": "local_steps",
    "mu": "mu",
    "server_optimizer": "server_optimizer",
    "server_lr": "server_lr",
    "clip": "clip",
    "noise_multiplier": "noise_multiplier",
    "target_epsilon": "target_epsilon",
    "delta": "delta",
    "secagg": "secagg",
    "drop_after_masking": "drop_after_masking",
    "clients_per_node": "clients_per_node",
    "lora_rank": "lora_rank",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/federated")
    p.add_argument("--data", default=None, help="shard directory (default: OUT/data)")
    p.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in OUT (same arguments)"
    )
    p.add_argument("--rounds", type=int, default=20, help="federated rounds (20)")
    p.add_argument("--sample-rate", type=float, default=None, help="each client's chance to take part (1)")
    p.add_argument("--local-steps", type=int, default=None, help="local steps per round (2)")
    p.add_argument("--mu", type=float, default=None, help="FedProx's proximal weight (0)")
    p.add_argument("--server-optimizer", choices=["avg", "adam"], default=None, help="avg (FedAvg) or adam")
    p.add_argument("--server-lr", type=float, default=None, help="server learning rate (1)")
    p.add_argument("--clip", type=float, default=None, help="clip each update to this L2 norm")
    p.add_argument("--noise-multiplier", type=float, default=None, help="client-level DP: noise z")
    p.add_argument("--target-epsilon", type=float, default=None, help="client-level DP: epsilon to plan for")
    p.add_argument("--delta", type=float, default=None, help="DP's delta (1 / clients)")
    p.add_argument("--secagg", action="store_const", const=True, default=None, help="secure aggregation")
    p.add_argument(
        "--drop-after-masking", type=float, default=None, help="secagg drill: fraction of clients killed"
    )
    p.add_argument("--clients-per-node", type=int, default=None, help="virtual clients per node (1)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA adapters of this rank (0: full)")
    add_run_arguments(p)
    p.set_defaults(optimizer="sgd", lr=0.05, steps=None)
    args = p.parse_args(argv)
    if args.steps is not None:
        p.error("--steps: a federated run is sized in --rounds (its token budget follows from them)")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be >= 1")
    given = {name: getattr(args, dest) for dest, name in FLAGS.items() if getattr(args, dest) is not None}
    args.param = [f"rounds={args.rounds}", *(f"{k}={v}" for k, v in given.items()), *args.param]
    # the token budget (which spaces the evaluations): the steps a node's sampled clients train in the rounds
    rate = given.get("sample_rate", 1.0)
    local = given.get("local_steps", 2)
    args.steps = max(1, round(args.rounds * rate * local * given.get("clients_per_node", 1)))
    return run_job(args, "federated", p)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark private federated aggregation: secure aggregation (SecAgg+ style) cost, dropout recovery, exactness.

    python jobs/bench_federated.py --out results/federated [--quick]
    ray job submit --working-dir . -- python jobs/bench_federated.py --out results/federated

No cluster: one process plays every client and the server of a round (edgeray.federated.secagg.run_round's
message order, timed per party). It runs, for n = 100 clients x 1.5M-parameter quantised updates on the
default graph (14 neighbours, threshold 3), rounds with 0%, 10% and 30% of the clients dropping after
masking, and reports each client's time (key agreement, sharing, masking, unmasking: median and max over
clients), the server's time (routing, summing, unmasking), and whether the unmasked sum equals the plain sum
of the survivors' quantised updates bit for bit. Targets: client <= 150 ms, server <= 500 ms (no dropout),
30% dropout recovered, sum bit-exact. Writes DIR/summary.json and DIR/secagg.png and prints a table.
--quick: 1 round per dropout level, 20 clients x 100,000 parameters.

--utility adds the privacy/utility run on a cluster (the topology's, started when there is none): the tiny
Llama pretrained with ``sync`` on IID shards, then its LoRA adapters fine-tuned with ``federated`` on non-IID
shards (100 virtual clients per node, 10% sampled per round, 2 local steps, SecAgg, clip 0.1, 20 rounds),
without DP and with client-level DP at epsilon <= 8 (delta 1 / clients). Target: the DP run's final
validation loss within 5% of the other's; also reported, the share of the non-DP run's improvement over the
base the DP run keeps. Writes DIR/utility.png (validation loss of both runs). --quick: 6 rounds, 30 clients
per node.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeray.atomic import write_atomic
from edgeray.federated.secagg import (
    MOD,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    abort_probability,
    levels_for,
)


def secagg_round(n: int, numel: int, dropout: float, seed: int) -> dict[str, Any]:
    """One round, every party timed on its own work; the dropped clients leave after sharing keys."""
    rng = np.random.default_rng(seed)
    params = SecAggParams.make(seed, range(n), numel)
    inputs = {c: rng.integers(0, levels_for(n) + 1, numel, dtype=np.uint32) for c in range(n)}
    dropped = set(rng.choice(n, round(dropout * n), replace=False).tolist())
    client_s = dict.fromkeys(range(n), 0.0)

    def timed(fn, *args):
        t0 = time.perf_counter()
        return fn(*args), time.perf_counter() - t0

    clients = {}
    for c in range(n):
        clients[c], dt = timed(SecAggClient, c, params)
        client_s[c] += dt
    adverts = {}
    for c, client in clients.items():
        adverts[c], dt = timed(client.advertise)
        client_s[c] += dt
    server = SecAggServer(params)
    routed, dt = timed(server.collect_adverts, adverts.values())
    server_s = dt
    for c, client in clients.items():
        (commitment, sealed), dt = timed(client.share_keys, routed[c])
        client_s[c] += dt
        _, dt = timed(server.collect_shares, c, commitment, sealed)
        server_s += dt
    for c, client in clients.items():
        box, dt = timed(server.sealed_for, c)
        server_s += dt
        _, dt = timed(client.receive, box)
        client_s[c] += dt
    for c, client in clients.items():
        if c in dropped:
            continue
        y, dt = timed(client.masked_input, inputs[c])
        client_s[c] += dt
        _, dt = timed(server.add_input, c, y)
        server_s += dt
    survivors, gone = server.roster()
    reveals = []
    for c in sorted(survivors):
        r, dt = timed(clients[c].unmask, survivors, gone)
        client_s[c] += dt
        reveals.append(r)
    total, dt = timed(server.unmask, reveals)
    server_s += dt
    plain = np.zeros(numel, dtype=np.int64)
    for c in survivors:
        plain += inputs[c]
    times = np.array([client_s[c] for c in range(n)])
    return {
        "clients": n,
        "numel": numel,
        "neighbours": params.neighbours,
        "threshold": params.threshold,
        "dropped": len(gone),
        "client_ms_median": float(np.median(times) * 1e3),
        "client_ms_max": float(times.max() * 1e3),
        "server_ms": server_s * 1e3,
        "bit_exact": bool(np.array_equal(total, (plain % MOD).astype(np.uint32))),
    }


def secagg(n: int, numel: int, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for dropout in (0.0, 0.1, 0.3):
        for r in range(rounds):
            row = secagg_round(n, numel, dropout, seed=r)
            rows.append({"dropout": dropout, **row})
            print(
                f"  dropout {dropout:.0%} round {r}: client {row['client_ms_median']:.0f} ms median "
                f"({row['client_ms_max']:.0f} max), server {row['server_ms']:.0f} ms, exact {row['bit_exact']}",
                flush=True,
            )
    return rows


def _median(rows: list[dict[str, Any]], dropout: float, key: str) -> float:
    return float(np.median([r[key] for r in rows if r["dropout"] == dropout]))


def targets(summary: dict[str, Any]) -> list[tuple[str, bool, str]]:
    rows = summary["secagg"]
    n, numel = rows[0]["clients"], rows[0]["numel"]
    client = _median(rows, 0.0, "client_ms_median")
    server = _median(rows, 0.0, "server_ms")
    late = [r for r in rows if r["dropout"] == 0.3]
    return [
        (f"SecAgg client <= 150 ms ({n} clients x {numel:,} values)", client <= 150,
         f"{client:.0f} ms median over clients and rounds"),
        (f"SecAgg server <= 500 ms ({n} clients x {numel:,} values, no dropout)", server <= 500, f"{server:.0f} ms"),
        ("30% dropout after masking recovered", all(r["bit_exact"] for r in late),
         f"{len(late)} round(s), server {_median(rows, 0.3, 'server_ms'):.0f} ms; abort probability of such a round "
         f"<= {summary['abort_probability_30pct']:.4f}"),
        ("unmasked sum bit-exact against the plain sum of the quantised updates", all(r["bit_exact"] for r in rows),
         f"{sum(r['bit_exact'] for r in rows)}/{len(rows)} rounds"),
    ]  # fmt: skip


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["secagg"]
    levels = sorted({r["dropout"] for r in rows})
    x = np.arange(len(levels))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(x - 0.2, [_median(rows, d, "client_ms_median") for d in levels], 0.4, label="client (median)")
    ax.bar(x + 0.2, [_median(rows, d, "server_ms") for d in levels], 0.4, label="server")
    ax.axhline(150, ls=":", c="C0", lw=1)
    ax.axhline(500, ls=":", c="C1", lw=1)
    ax.set_xticks(x, [f"{d:.0%}" for d in levels])
    ax.set_xlabel("clients dropping after masking")
    ax.set_ylabel("ms per round")
    r0 = rows[0]
    ax.set_title(
        f"SecAgg: {r0['clients']} clients x {r0['numel']:,} values (k {r0['neighbours']}, t {r0['threshold']})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- utility
EPSILON = 8.0


def utility(topology_name: str, out: Path, quick: bool) -> dict[str, Any]:
    """The privacy/utility trade-off on a real cluster: pretrain the tiny Llama (``sync``, IID shards), then
    fine-tune its LoRA adapters federated on non-IID shards (many virtual clients per node, Poisson
    sampling, SecAgg), once without DP and once with client-level DP at epsilon <= 8, the same seed."""
    import os

    from edgeray import cluster
    from edgeray.topology import load_topology, resolve_topology_path
    from edgeray.train.sync import SyncConfig, WorkerPool, prepare_data, run_sync

    topo = load_topology(resolve_topology_path(topology_name))
    rounds, per_node, pretrain = (6, 30, 30) if quick else (20, 100, 60)
    rate, local = 0.1, 2
    fed = {
        "rounds": rounds, "clients_per_node": per_node, "sample_rate": rate, "local_steps": local,
        "lora_rank": 8, "clip": 0.1, "secagg": True,
    }  # fmt: skip
    iid = prepare_data(topo, out / "data", seq_len=64)
    non_iid = prepare_data(topo, out / "data-non-iid", seq_len=64, non_iid=True)
    ckpt = out / "pretrain" / "checkpoint"

    def say(message: str) -> None:
        print(message, flush=True)

    runs: dict[str, Any] = {}
    with cluster.driver(topo, name=f"bench-federated-{os.getpid()}"), WorkerPool() as pool:
        say(f"utility: pretraining the base ({pretrain} sync steps, IID) ...")
        base = run_sync(SyncConfig(strategy="sync", steps=pretrain, evals=1), topo, data_dir=iid,
                        out=out / "pretrain", pool=pool, progress=say)  # fmt: skip
        for label, dp in (("no_dp", {}), ("dp", {"target_epsilon": EPSILON})):
            say(f"utility: federated LoRA fine-tune, {label} ...")
            config = SyncConfig(
                strategy="federated", params={**fed, **dp}, optimizer="sgd", lr=1.0, init_from=str(ckpt),
                steps=round(rounds * rate * local * per_node), evals=4,
            )  # fmt: skip
            runs[label] = run_sync(config, topo, data_dir=non_iid, out=out / label, pool=pool, progress=say)
    keep = ("final_val_loss", "epsilon", "delta", "noise_multiplier", "rounds", "clients_per_round",
            "dropped", "inter_region_bytes", "secagg_client_ms", "secagg_server_ms", "evals")  # fmt: skip
    result = {
        "setup": {**fed, "clients": per_node * len(topo.nodes), "pretrain_steps": pretrain, "lr": 1.0},
        "base_val_loss": base["final_val_loss"],
        **{label: {k: r.get(k) for k in keep} for label, r in runs.items()},
    }
    no_dp, dp = result["no_dp"]["final_val_loss"], result["dp"]["final_val_loss"]
    result["dp_over_no_dp"] = dp / no_dp - 1
    gain = result["base_val_loss"] - no_dp
    result["gain_retained"] = (result["base_val_loss"] - dp) / gain if gain > 0 else None
    return result


def utility_target(u: dict[str, Any]) -> tuple[str, bool, str]:
    dp = u["dp"]
    retained = "n/a" if u["gain_retained"] is None else f"{u['gain_retained']:.0%}"
    return (
        f"client DP at epsilon <= {EPSILON:g}: final validation loss within 5% of the run without DP",
        dp["epsilon"] <= EPSILON and u["dp_over_no_dp"] <= 0.05,
        f"{dp['final_val_loss']:.4f} vs {u['no_dp']['final_val_loss']:.4f} ({u['dp_over_no_dp']:+.2%}) at "
        f"epsilon {dp['epsilon']:.2f}, delta {dp['delta']:.1e}, {dp['clients_per_round']:.0f} clients per round "
        f"of {u['setup']['clients']}; base {u['base_val_loss']:.4f}, improvement retained {retained}",
    )


def plot_utility(u: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, name in (("no_dp", "no DP"), ("dp", f"DP, epsilon {u['dp']['epsilon']:.1f}")):
        evals = u[label]["evals"]
        ax.plot([e["tokens"] / 1e3 for e in evals], [e["val_loss"] for e in evals], marker="o", label=name)
    ax.axhline(u["base_val_loss"], ls=":", c="grey", lw=1, label="pretrained base")
    ax.set_xlabel("tokens trained by the clients (thousands)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Federated LoRA fine-tune, {u['dp']['clients_per_round']:.0f} clients per round, SecAgg")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/federated")
    parser.add_argument("--quick", action="store_true", help="1 round per level, 20 clients x 100,000 values")
    parser.add_argument(
        "--utility",
        action="store_true",
        help="also the DP utility run on a cluster (the topology's, started when there is none)",
    )
    parser.add_argument("--topology", default="local")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n, numel, rounds = (20, 100_000, 1) if args.quick else (100, 1_500_000, 3)
    print(f"secure aggregation: {n} clients x {numel:,} values ...", flush=True)
    summary: dict[str, Any] = {"secagg": secagg(n, numel, rounds)}
    p = SecAggParams.make(0, range(n), numel)
    summary["abort_probability_30pct"] = abort_probability(n, p.neighbours, p.threshold, 0.3)
    rows = targets(summary)
    if args.utility:
        summary["utility"] = utility(args.topology, out / "utility", args.quick)
        rows.append(utility_target(summary["utility"]))
        plot_utility(summary["utility"], out / "utility.png")
    summary["targets"] = [{"target": t, "met": ok, "value": v} for t, ok, v in rows]
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    plot(summary, out / "secagg.png")
    print(
        f"\n{'dropout':>8} {'dropped':>8} {'client ms':>10} {'client max':>11} {'server ms':>10} {'exact':>6}"
    )
    for r in summary["secagg"]:
        print(f"{r['dropout']:>8.0%} {r['dropped']:>8} {r['client_ms_median']:>10.0f} {r['client_ms_max']:>11.0f} "
              f"{r['server_ms']:>10.0f} {r['bit_exact']!s:>6}")  # fmt: skip
    print()
    for t, ok, v in rows:
        print(f"{'met ' if ok else 'MISS'} {t}: {v}")
    print(
        f"\nwrote {out / 'summary.json'}, {out / 'secagg.png'}" + (" and utility.png" if args.utility else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``federated``: federated rounds (FedAvg, McMahan et al. 2017; FedProx, Li et al. 2020; FedAdam, Reddi et al.
2021) on the strategy interface, with the server actor as the aggregator.

Each round samples every live client with probability ``sample_rate`` (Poisson sampling, from a stream
seeded by the run's seed and the round, so a resumed run samples the same clients). Every sampled client
trains ``local_steps`` steps from the global model on its own shard, with its own optimizer (``SyncConfig``'s)
and, for FedProx, the proximal term mu/2 ||w - w_global||^2 in its gradient; it then sends its update
(w - w_global) times its weight (its tokens this round over the round's total) to the server through the
fabric. The server sums the weighted updates and moves the global model with its optimizer: ``avg``
(w += server_lr x update, FedAvg's at server_lr 1) or ``adam`` (FedAdam: m = b1 m + (1 - b1) u,
v = b2 v + (1 - b2) u^2, w += server_lr m / (sqrt(v) + tau)). Every live client then receives the global
model. Modelled time of a round: the slowest sampled client's local steps, then the slowest upload, then the
slowest download (transfers to and from the server in parallel; the server port's queueing is not modelled,
as in the parameter-server strategies). A round that samples nobody trains nothing and moves nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from edgeray.fabric.backend import EdgeGroup, FabricError
from edgeray.train.strategies.base import Params, Strategy, flat, unflat_

if TYPE_CHECKING:
    from edgeray.train.sync import Node, Run, SyncWorker

SERVER_OPTIMIZERS = ("avg", "adam")


@dataclasses.dataclass(frozen=True)
class FederatedParams(Params):
    sample_rate: float = 1.0
    """Each live client takes part in a round with this probability (Poisson sampling)."""
    local_steps: int = 2
    mu: float = 0.0
    """FedProx's proximal weight (0: FedAvg)."""
    server_optimizer: str = "avg"
    server_lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    """FedAdam's adaptivity (the epsilon under the square root's sum)."""

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.sample_rate <= 1:
            out.append(f"sample_rate = {self.sample_rate}: must be in (0, 1]")
        if self.local_steps < 1:
            out.append(f"local_steps = {self.local_steps}: must be >= 1")
        if self.mu < 0:
            out.append(f"mu = {self.mu}: must be >= 0")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            out.append(f"server_optimizer = {self.server_optimizer!r}: valid are {list(SERVER_OPTIMIZERS)}")
        if not self.server_lr > 0:
            out.append(f"server_lr = {self.server_lr}: must be > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            out.append(f"beta1 = {self.beta1}, beta2 = {self.beta2}: must be in [0, 1)")
        if not self.tau > 0:
            out.append(f"tau = {self.tau}: must be > 0")
        return out


def sample_clients(seed: int, round_: int, names: list[str], rate: float) -> list[str]:
    """Round ``round_``'s Poisson sample of ``names`` (in their order): each kept with probability ``rate``."""
    keep = np.random.default_rng([seed, round_, 0xFEDA]).random(len(names)) < rate
    return [n for n, k in zip(names, keep, strict=True) if k]


class Federated(Strategy):
    name = "federated"
    params_type = FederatedParams
    uses_server = True
    joins_from = "server"
    driver_state = ("round_",)

    # ------------------------------------------------------------------ driver
    def run(self, run: Run) -> None:
        p = self.params
        assert isinstance(p, FederatedParams)
        if not run.resumed:
            run.regroup()
            run.maybe_eval()
            self.round_ = 0

        def on_join(n: Node, at: float) -> None:
            run.fetch_from_server(n)

        while run.tokens < run.budget:
            run.apply_churn(run.now, on_join, regroup_on_leave=True)
            live = run.live()
            if not live:
                break
            names = sorted(n.name for n in live)
            chosen = [
                run.nodes[c] for c in sample_clients(run.config.seed, self.round_, names, p.sample_rate)
            ]
            self.round_ += 1
            if not chosen:
                run.record("round", None, clients=[], loss=float("nan"))
                continue
            try:
                self._round(run, live, chosen)
            except (ray.exceptions.RayError, FabricError) as exc:
                run.lost(exc, "federated round")
                run.regroup()
                continue
            run.maybe_eval()

    def _round(self, run: Run, live: list[Node], chosen: list[Node]) -> None:
        p = self.params
        assert isinstance(p, FederatedParams)
        run.call([n.actor.op.remote("begin_round") for n in chosen], "round start")
        tokens = dict.fromkeys((n.name for n in chosen), 0)
        losses = []
        for _ in range(p.local_steps):
            results = run.call([n.actor.compute.remote() for n in chosen], "local step")
            run.call([n.actor.op.remote("local_step", p.mu) for n in chosen], "local step")
            for n, r in zip(chosen, results, strict=True):
                n.steps += 1
                n.tokens += r["tokens"]
                tokens[n.name] += r["tokens"]
                run.tokens += r["tokens"]
                losses.append(r["loss"])
        total = sum(tokens.values())
        up = []
        for n in chosen:  # one sender at a time into the server (ranks are per sender)
            rank = run.rank(n.name) + 1
            up.append(
                run.call(
                    [
                        n.actor.op.remote("push_update", tokens[n.name] / total),
                        run.server.op.remote("pull_update", rank),
                    ],
                    "update upload",
                )
            )
        run.call([run.server.op.remote("apply_round")], "server update")
        down = []
        for n in live:
            rank = run.rank(n.name) + 1
            down.append(
                run.call(
                    [run.server.send_params.remote(rank), n.actor.recv_params.remote(0)], "model download"
                )
            )
        compute = p.local_steps * max(run.compute_s(n.name) for n in chosen)
        run.now += (
            compute + max(run.account(parts) for parts in up) + max(run.account(parts) for parts in down)
        )
        run.record("round", None, clients=[n.name for n in chosen], loss=float(np.mean(losses)))

    def summary(self, run: Run) -> dict[str, Any]:
        rounds = [m for m in run.metrics if m["event"] == "round"]
        return {
            "rounds": len(rounds),
            "clients_per_round": float(np.mean([len(m["clients"]) for m in rounds])) if rounds else 0.0,
        }

    # ------------------------------------------------------------------ worker (and server) side
    def setup_worker(self, worker: SyncWorker) -> None:
        worker.extra["global"] = None  # a client: the global model at the round's start
        worker.extra["acc"] = None  # the server: the round's summed weighted updates

    def op_begin_round(self, worker: SyncWorker) -> list[dict[str, Any]]:
        worker.extra["global"] = flat(worker.params)
        return worker.rows()

    def op_local_step(self, worker: SyncWorker, mu: float) -> list[dict[str, Any]]:
        """One optimizer step with the kept gradient, plus FedProx's mu (w - w_global) when mu > 0."""
        assert worker.grad is not None
        grad = worker.grad
        if mu > 0:
            grad = grad + mu * (flat(worker.params) - worker.extra["global"])
        worker.apply(grad)
        return worker.rows()

    def op_push_update(self, worker: SyncWorker, weight: float) -> list[dict[str, Any]]:
        update = (flat(worker.params) - worker.extra["global"]) * weight
        EdgeGroup.get(worker.server_group()).send_to(update, 0)
        return worker.rows()

    def op_pull_update(self, worker: SyncWorker, src: int) -> list[dict[str, Any]]:
        buf = EdgeGroup.get(worker.server_group()).recv_from(torch.empty(worker.numel), src)
        acc = worker.extra["acc"]
        worker.extra["acc"] = buf.clone() if acc is None else acc + buf
        return worker.rows()

    def op_apply_round(self, worker: SyncWorker) -> None:
        """The server: move the global model by the round's update with the server optimizer."""
        p = self.params
        assert isinstance(p, FederatedParams)
        update = worker.extra["acc"]
        worker.extra["acc"] = None
        w = flat(worker.params)
        if p.server_optimizer == "avg":
            w += p.server_lr * update
        else:
            m = worker.extra.get("m", torch.zeros_like(update))
            v = worker.extra.get("v", torch.zeros_like(update))
            m = p.beta1 * m + (1 - p.beta1) * update
            v = p.beta2 * v + (1 - p.beta2) * update * update
            worker.extra["m"], worker.extra["v"] = m, v
            w += p.server_lr * m / (v.sqrt() + p.tau)
        unflat_(w, worker.params)

    def worker_state(self, worker: SyncWorker) -> dict[str, Any]:
        return {k: worker.extra[k] for k in ("m", "v") if k in worker.extra}  # FedAdam's moments (server)

    def load_worker_state(self, worker: SyncWorker, state: dict[str, Any]) -> None:
        worker.extra.update(state)

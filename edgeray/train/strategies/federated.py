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

Client-level differential privacy (``noise_multiplier`` or ``target_epsilon``, with ``clip``): DP-FedAvg
(McMahan et al. 2018). Each update is clipped to L2 norm ``clip`` and weighted 1 / (q N) (N: the clients
at the round, q N the expected sample), the server adds Gaussian noise of standard deviation z clip / (q N)
to the sum (every round, sampled or not), and the driver's accountant (edgeray.federated.dp, dp-accounting's
RDP) reports epsilon at ``delta`` after every round (metrics' ``epsilon``, summary.json's ``epsilon`` and
``dp_history``). A ``target_epsilon`` becomes the smallest z that meets it over the planned rounds,
steps / (q x local_steps), and the run stops after them. The noise is central (the server sees the
un-noised sum); secure aggregation (edgeray.federated.secagg) is not wired in yet.

Every run appends one entry per round to ``OUT/audit.jsonl`` (edgeray.federated.audit: round, participants,
dropouts, clip, noise, epsilon so far, the new model's SHA-256, the configuration's hash), verified by
``edgeray audit verify OUT``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from edgeray.fabric.backend import EdgeGroup, FabricError
from edgeray.federated.audit import AuditLog, digest
from edgeray.federated.dp import Accountant, DPConfig
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
    clip: float | None = None
    """Clip each client's update to this L2 norm (needed when DP is on)."""
    noise_multiplier: float | None = None
    """Client-level DP on: Gaussian noise of standard deviation z x clip / (q N) on the averaged update."""
    target_epsilon: float | None = None
    """Client-level DP on: the smallest noise that keeps epsilon within this over the planned rounds
    (steps / (sample_rate x local_steps)); the run stops after them."""
    delta: float | None = None
    """DP's delta (default: 1 / the clients at the start)."""

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    def dp(self) -> DPConfig:
        return DPConfig(self.clip or 0.0, self.noise_multiplier, self.target_epsilon, self.delta)

    def problems(self) -> list[str]:
        out = self.dp().problems() if self.private else []
        if self.clip is not None and not self.clip > 0 and not self.private:
            out.append(f"clip = {self.clip}: must be > 0")
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
    driver_state = ("round_", "dp", "planned", "history", "noise_key")

    # ------------------------------------------------------------------ driver
    def run(self, run: Run) -> None:
        p = self.params
        assert isinstance(p, FederatedParams)
        if not run.resumed:
            run.regroup()
            self.round_ = 0
            self.dp: DPConfig | None = None
            self.planned: int | None = None  # DP: the rounds the privacy budget is planned for
            self.history: list[tuple[float, float, int]] = []  # DP: the accountant's (z, q, rounds)
            self.noise_key = secrets.randbits(63)  # seeds the server's noise; kept only in checkpoints
            if p.private:
                self.planned = math.ceil(run.config.steps / (p.sample_rate * p.local_steps))
                self.dp = p.dp().resolve(len(run.live()), p.sample_rate, self.planned)
            run.maybe_eval()
        audit = AuditLog(run.out / "audit.jsonl") if run.out is not None else None
        if audit is not None and run.resumed:
            audit.append(event="resume", round=self.round_)  # the rounds after it run, and are logged, again
        config_hash = digest({"strategy": dataclasses.asdict(p), "seed": run.config.seed})

        def on_join(n: Node, at: float) -> None:
            run.fetch_from_server(n)

        while run.tokens < run.budget and (self.planned is None or self.round_ < self.planned):
            run.apply_churn(run.now, on_join, regroup_on_leave=True)
            live = run.live()
            if not live:
                break
            names = sorted(n.name for n in live)
            chosen = [
                run.nodes[c] for c in sample_clients(run.config.seed, self.round_, names, p.sample_rate)
            ]
            self.round_ += 1
            if not chosen and self.dp is None:
                run.record("round", None, clients=[], loss=float("nan"))
                continue
            epsilon = None
            if self.dp is not None:  # counted before the round: one that fails part-way may have released
                assert self.dp.noise_multiplier is not None and self.dp.delta is not None
                accountant = Accountant(self.history)
                accountant.step(self.dp.noise_multiplier, p.sample_rate)
                self.history = accountant.history()
                epsilon = accountant.epsilon(self.dp.delta)
            try:
                model_hash = self._round(run, live, chosen, len(names))
            except (ray.exceptions.RayError, FabricError) as exc:
                gone = run.lost(exc, "federated round")
                run.regroup()
                if audit is not None:
                    audit.append(
                        round=self.round_ - 1, participants=[n.name for n in chosen],
                        dropouts=[n.name for n in gone], completed=False, epsilon=epsilon,
                    )  # fmt: skip
                continue
            if epsilon is not None:
                run.metrics[-1]["epsilon"] = epsilon
            if audit is not None:
                audit.append(
                    round=self.round_ - 1, participants=[n.name for n in chosen], dropouts=[], completed=True,
                    clip=p.clip, noise_multiplier=self.dp.noise_multiplier if self.dp else None,
                    sample_rate=p.sample_rate, epsilon=epsilon, delta=self.dp.delta if self.dp else None,
                    model_hash=model_hash, config_hash=config_hash,
                )  # fmt: skip
            run.maybe_eval()

    def _round(self, run: Run, live: list[Node], chosen: list[Node], population: int) -> str:
        """One round; returns the new global model's SHA-256."""
        p = self.params
        assert isinstance(p, FederatedParams)
        # the server drops what a failed round left in its sum; the clients keep the global model
        run.call([run.server.op.remote("begin_round"), *(n.actor.op.remote("begin_round") for n in chosen)],
                 "round start")  # fmt: skip
        tokens = dict.fromkeys((n.name for n in chosen), 0)
        losses = []
        for _ in range(p.local_steps if chosen else 0):
            results = run.call([n.actor.compute.remote() for n in chosen], "local step")
            run.call([n.actor.op.remote("local_step", p.mu) for n in chosen], "local step")
            for n, r in zip(chosen, results, strict=True):
                n.steps += 1
                n.tokens += r["tokens"]
                tokens[n.name] += r["tokens"]
                run.tokens += r["tokens"]
                losses.append(r["loss"])
        total = sum(tokens.values())
        # DP-FedAvg (McMahan et al. 2018): clipped updates, each weighted 1 / (q N) (N: the live clients, q N
        # the expected sample), so one client moves the sum by at most clip / (q N); the noise on the sum has
        # standard deviation z clip / (q N). Without DP the weights are the clients' token shares.
        fixed = 1 / (p.sample_rate * population) if self.dp is not None else None
        up = []
        for n in chosen:  # one sender at a time into the server (ranks are per sender)
            weight = fixed if fixed is not None else tokens[n.name] / total
            rank = run.rank(n.name) + 1
            up.append(
                run.call(
                    [
                        n.actor.op.remote("push_update", weight, p.clip),
                        run.server.op.remote("pull_update", rank),
                    ],
                    "update upload",
                )
            )
        noise = 0.0
        if self.dp is not None:
            assert self.dp.noise_multiplier is not None and fixed is not None
            noise = self.dp.noise_multiplier * self.dp.clip * fixed
        [model_hash] = run.call(
            [run.server.op.remote("apply_round", noise, [self.noise_key, self.round_])], "server update"
        )
        down = []
        for n in live:
            rank = run.rank(n.name) + 1
            down.append(
                run.call(
                    [run.server.send_params.remote(rank), n.actor.recv_params.remote(0)], "model download"
                )
            )
        compute = p.local_steps * max((run.compute_s(n.name) for n in chosen), default=0.0)
        upload = max((run.account(parts) for parts in up), default=0.0)
        run.now += compute + upload + max(run.account(parts) for parts in down)
        loss = float(np.mean(losses)) if losses else float("nan")
        run.record("round", None, clients=[n.name for n in chosen], loss=loss)
        return str(model_hash)

    def summary(self, run: Run) -> dict[str, Any]:
        rounds = [m for m in run.metrics if m["event"] == "round"]
        out: dict[str, Any] = {
            "rounds": len(rounds),
            "clients_per_round": float(np.mean([len(m["clients"]) for m in rounds])) if rounds else 0.0,
        }
        if self.dp is not None:
            assert self.dp.delta is not None
            out.update(
                epsilon=Accountant(self.history).epsilon(self.dp.delta), delta=self.dp.delta,
                noise_multiplier=self.dp.noise_multiplier, clip=self.dp.clip, dp_history=self.history,
                planned_rounds=self.planned,
            )  # fmt: skip
        return out

    # ------------------------------------------------------------------ worker (and server) side
    def setup_worker(self, worker: SyncWorker) -> None:
        worker.extra["global"] = None  # a client: the global model at the round's start
        worker.extra["acc"] = None  # the server: the round's summed weighted updates

    def op_begin_round(self, worker: SyncWorker) -> list[dict[str, Any]]:
        worker.extra["global"] = flat(worker.params)
        worker.extra["acc"] = None
        return worker.rows()

    def op_local_step(self, worker: SyncWorker, mu: float) -> list[dict[str, Any]]:
        """One optimizer step with the kept gradient, plus FedProx's mu (w - w_global) when mu > 0."""
        assert worker.grad is not None
        grad = worker.grad
        if mu > 0:
            grad = grad + mu * (flat(worker.params) - worker.extra["global"])
        worker.apply(grad)
        return worker.rows()

    def op_push_update(
        self, worker: SyncWorker, weight: float, clip: float | None = None
    ) -> list[dict[str, Any]]:
        """Send (w - w_global), clipped to L2 norm ``clip`` when given, times ``weight`` to the server."""
        update = flat(worker.params) - worker.extra["global"]
        if clip is not None:
            update = update * min(1.0, clip / max(float(update.norm()), 1e-30))
        update = update * weight
        EdgeGroup.get(worker.server_group()).send_to(update, 0)
        return worker.rows()

    def op_pull_update(self, worker: SyncWorker, src: int) -> list[dict[str, Any]]:
        buf = EdgeGroup.get(worker.server_group()).recv_from(torch.empty(worker.numel), src)
        acc = worker.extra["acc"]
        worker.extra["acc"] = buf.clone() if acc is None else acc + buf
        return worker.rows()

    def op_apply_round(self, worker: SyncWorker, noise_std: float = 0.0, noise_seed: Any = None) -> str:
        """The server: move the global model by the round's update, plus Gaussian noise of ``noise_std`` when
        DP is on, with the server optimizer; returns the new model's SHA-256."""
        p = self.params
        assert isinstance(p, FederatedParams)
        w = flat(worker.params)
        update = worker.extra["acc"] if worker.extra["acc"] is not None else torch.zeros_like(w)
        worker.extra["acc"] = None
        if noise_std > 0:  # a DP round releases its noise even when nobody was sampled
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence(noise_seed).generate_state(1)[0]))
            update = update + noise_std * torch.randn(update.shape, generator=gen)
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
        return hashlib.sha256(flat(worker.params).numpy().tobytes()).hexdigest()

    def worker_state(self, worker: SyncWorker) -> dict[str, Any]:
        return {k: worker.extra[k] for k in ("m", "v") if k in worker.extra}  # FedAdam's moments (server)

    def load_worker_state(self, worker: SyncWorker, state: dict[str, Any]) -> None:
        worker.extra.update(state)

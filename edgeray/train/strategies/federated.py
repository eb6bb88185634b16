"""``federated``: federated rounds (FedAvg, McMahan et al. 2017; FedProx, Li et al. 2020; FedAdam, Reddi et al.
2021) on the strategy interface, with the server actor as the aggregator.

Clients: each node hosts ``clients_per_node`` clients (1: the node is the client), each with its own shard
(the node's cut in contiguous blocks, one Parquet file each: edgeray.model.shards.split_clients). Each round
samples every client of the live nodes with probability ``sample_rate`` (Poisson sampling, from a stream
seeded by the run's seed and the round, so a resumed run samples the same clients). Every sampled client
trains ``local_steps`` steps from the global model on its own shard, with ``SyncConfig``'s optimizer (fresh
every round for virtual clients; a node-client keeps its state) and, for FedProx, the proximal term
mu/2 ||w - w_global||^2 in its gradient. A node trains its sampled clients one after the other and sends the
server, through the fabric, the sum of their updates (w - w_global), each clipped to ``clip`` when given and
times its weight (1 / the clients sampled: they train equal tokens). With ``hierarchical`` a region's nodes
send to its first one, which sums them and forwards one vector. The server moves the global model by the
sum with its optimizer: ``avg`` (w += server_lr x update, FedAvg's at server_lr 1) or ``adam`` (FedAdam:
m = b1 m + (1 - b1) u, v = b2 v + (1 - b2) u^2, w += server_lr m / (sqrt(v) + tau)). Every live node then
receives the global model. A node that dies on the way is left out and the survivors re-weighted. Modelled
time of a round: the slowest node's local steps (its clients in turn), then the slowest upload (two hops
when hierarchical), then the slowest download (transfers to and from the server in parallel; the server
port's queueing is not modelled, as in the parameter-server strategies). A round that samples nobody trains
nothing and moves nothing.

The model: the whole of it, or LoRA adapters (``lora_rank``, peft) on ``lora_targets``, which are then the
only parameters that train, are clipped, noised and travel; the run's checkpoint holds them merged
(:meth:`Federated.prepare_model`, :meth:`Federated.export_model`). ``SyncConfig.init_from`` starts from a
checkpoint.

Client-level differential privacy (``noise_multiplier`` or ``target_epsilon``, with ``clip``): DP-FedAvg
(McMahan et al. 2018). Each update is clipped to L2 norm ``clip`` and weighted 1 / (q N) (N: the clients
at the round, q N the expected sample), the server adds Gaussian noise of standard deviation z clip / (q N)
to the sum (every round, sampled or not), and the driver's accountant (edgeray.federated.dp, dp-accounting's
RDP) reports epsilon at ``delta`` after every round (metrics' ``epsilon``, summary.json's ``epsilon`` and
``dp_history``). A ``target_epsilon`` becomes the smallest z that meets it over the planned rounds
(``rounds``, else steps / (q x local_steps)), and the run stops after them. Without secure aggregation the
noise is central (the server adds it, and sees the un-noised sum). Without DP each round also records the
median norm of the clients' updates (``update_norm``), to choose ``clip`` by.

Secure aggregation (``secagg``, edgeray.federated.secagg, SecAgg+), among the round's nodes (a node's
clients are summed inside it): they agree keys, share their mask secrets among their neighbours, and each
sends its summed update quantised to uint32 and masked through the fabric (4 bytes per parameter); the
server (and a region's aggregator) sums the masked vectors and learns only the sum, also when nodes drop
after masking (``secagg_dropout`` sizes the threshold; ``drop_after_masking`` is a drill that kills that
fraction of each round's nodes after they shared their keys). Without DP the survivors' clients are
re-weighted. With DP each node adds Gaussian noise of standard deviation sigma / sqrt(m) (sigma =
z clip / (q N), m = ``min_survivors``: the fewest surviving nodes that still add all of sigma), so no party
sees the un-noised sum; a round with fewer survivors is not applied (its privacy cost is still counted).
The key messages go through Ray's control plane and are charged to the ledger (op ``secagg-keys``) and the
modelled clock by the link model; a round that cannot be unmasked (too few shares, or fewer than 2 nodes
with sampled clients) changes nothing and says why (metrics' ``aborted``, the audit log).

Example-level DP-SGD inside the clients (``dp_sgd_noise``, Opacus): see :class:`FederatedParams`.

Every run appends one entry per round to ``OUT/audit.jsonl`` (edgeray.federated.audit: round, participants,
dropouts, clip, noise, epsilon so far, the new model's SHA-256, the configuration's hash), verified by
``edgeray audit verify OUT``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from edgeray.fabric.backend import EdgeGroup, FabricError
from edgeray.fabric.codecs import CODECS
from edgeray.fabric.ledger import Ledger
from edgeray.fabric.links import LinkModel
from edgeray.federated.audit import AuditLog, digest
from edgeray.federated.dp import Accountant, DPConfig
from edgeray.federated.secagg import (
    SecAggAbort,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    dequantize,
    quantize_bounded,
)
from edgeray.model.shards import read_client_shard
from edgeray.train.strategies.base import Params, Strategy, StrategyError, flat, unflat_

if TYPE_CHECKING:
    from edgeray.train.sync import Node, Run, SyncWorker

SERVER_OPTIMIZERS = ("avg", "adam")


@dataclasses.dataclass(frozen=True)
class FederatedParams(Params):
    rounds: int | None = None
    """Stop after this many rounds (default: when the run's token budget is spent)."""
    clients_per_node: int = 1
    """Virtual clients each node hosts, each with its own Parquet shard (the node's cut in contiguous blocks,
    edgeray.model.shards.split_clients) and a fresh local optimizer every round; a node trains its sampled
    clients one after the other and sends the server their summed update. 1: the node is the client (its
    optimizer state carries over rounds)."""
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
    (``rounds``, else steps / (sample_rate x local_steps)); the run stops after them."""
    delta: float | None = None
    """DP's delta (default: 1 / the clients at the start)."""
    dp_sgd_noise: float | None = None
    """Example-level DP-SGD inside every client (Opacus): each example's gradient clipped to ``dp_sgd_clip``,
    Gaussian noise of this multiplier x ``dp_sgd_clip`` on their sum. Its epsilon (summary's
    ``example_epsilon``, at ``dp_sgd_delta``) composes one Gaussian mechanism per pass over a client's data,
    without amplification by sampling: a client's batches are not randomly sampled."""
    dp_sgd_clip: float = 1.0
    dp_sgd_delta: float = 1e-5
    secagg: bool = False
    """Secure aggregation (edgeray.federated.secagg): the server learns only the sum of the round's updates
    (needs ``clip``, the range updates are quantised in). With DP on, the clients add the noise."""
    secagg_dropout: float = 0.3
    """The fraction of a round's clients that may drop after masking: the threshold is sized for it and,
    with DP on, each client's share of the noise is sized so that the survivors still add all of it."""
    drop_after_masking: float = 0.0
    """A dropout drill (needs secagg): this fraction of every round's clients (rounded down, drawn from the
    run's seed) is killed after sharing its keys, before its masked update is sent: real deaths."""
    codec: str = "none"
    """Codec of the uploaded updates without secagg (see edgeray.fabric.codecs)."""
    hierarchical: bool = False
    """Aggregate by region, then in the cloud: a region's participating nodes send their updates to its first
    one, which sums them (with secagg: the masked vectors, mod 2^32) and sends the server one vector, so one
    upload per region crosses the inter-region links."""
    lora_rank: int = 0
    """LoRA adapters (peft) of this rank on ``lora_targets``: only they are trained, clipped, aggregated and
    sent; the base model stays frozen. 0: full fine-tuning. The run's checkpoint/ holds the merged model."""
    lora_alpha: int = 16
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    """Comma-separated module names that get adapters (the Llama attention projections by default)."""

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    def dp(self) -> DPConfig:
        return DPConfig(self.clip or 0.0, self.noise_multiplier, self.target_epsilon, self.delta)

    def problems(self) -> list[str]:
        out = self.dp().problems() if self.private else []
        if self.clip is not None and not self.clip > 0 and not self.private:
            out.append(f"clip = {self.clip}: must be > 0")
        if self.dp_sgd_noise is not None:
            if not self.dp_sgd_noise > 0:
                out.append(f"dp_sgd_noise = {self.dp_sgd_noise}: must be > 0 (None: no example-level DP)")
            if not self.dp_sgd_clip > 0:
                out.append(f"dp_sgd_clip = {self.dp_sgd_clip}: must be > 0")
            if not 0 < self.dp_sgd_delta < 1:
                out.append(f"dp_sgd_delta = {self.dp_sgd_delta}: must be in (0, 1)")
            if self.mu > 0:
                out.append(f"mu = {self.mu} with dp_sgd_noise: FedProx's term is not part of DP-SGD's step; "
                           "use mu = 0")  # fmt: skip
        if self.lora_rank < 0:
            out.append(f"lora_rank = {self.lora_rank}: must be >= 0 (0: full fine-tuning)")
        if self.lora_rank > 0 and not self.lora_alpha > 0:
            out.append(f"lora_alpha = {self.lora_alpha}: must be > 0")
        if self.lora_rank > 0 and not [t for t in self.lora_targets.split(",") if t.strip()]:
            out.append("lora_targets is empty: name the modules that get adapters, e.g. q_proj,v_proj")
        if self.clients_per_node < 1:
            out.append(f"clients_per_node = {self.clients_per_node}: must be >= 1")
        if self.rounds is not None and self.rounds < 1:
            out.append(f"rounds = {self.rounds}: must be >= 1")
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
        if self.codec not in CODECS:
            out.append(f"codec = {self.codec!r}: valid codecs are {sorted(CODECS)}")
        if self.secagg and self.clip is None:
            out.append("secagg = True needs clip: the L2 norm updates are clipped to before quantisation")
        if self.secagg and self.codec != "none":
            out.append(f"codec = {self.codec!r}: secagg sends masked integers, which no codec may change; "
                       "use codec = 'none'")  # fmt: skip
        if not 0 <= self.secagg_dropout < 1:
            out.append(f"secagg_dropout = {self.secagg_dropout}: must be in [0, 1)")
        if not 0 <= self.drop_after_masking < 1:
            out.append(f"drop_after_masking = {self.drop_after_masking}: must be in [0, 1)")
        if self.drop_after_masking > 0 and not self.secagg:
            out.append(f"drop_after_masking = {self.drop_after_masking}: a secure-aggregation drill, needs "
                       "secagg = True")  # fmt: skip
        return out

    def client_names(self, node: str) -> list[str]:
        """The clients ``node`` hosts: itself, or ``node/0`` .. ``node/K-1``."""
        if self.clients_per_node == 1:
            return [node]
        return [f"{node}/{i}" for i in range(self.clients_per_node)]

    def host(self, client: str) -> str:
        return client if self.clients_per_node == 1 else client.rpartition("/")[0]

    def index(self, client: str) -> int:
        return 0 if self.clients_per_node == 1 else int(client.rpartition("/")[2])

    def min_survivors(self, clients: int) -> int:
        """With secagg and DP: the fewest survivors whose noise shares add up to the planned noise."""
        return max(1, math.floor((1 - self.secagg_dropout) * clients + 1e-9))


def example_epsilon(noise_multiplier: float, passes: int, delta: float) -> float:
    """Example-level epsilon of DP-SGD that used each example at most ``passes`` times, each a Gaussian
    mechanism of ``noise_multiplier`` (no amplification by sampling), by dp-accounting's RDP."""
    if passes == 0:
        return 0.0
    return Accountant([(noise_multiplier, 1.0, passes)]).epsilon(delta)


def sample_clients(seed: int, round_: int, names: list[str], rate: float) -> list[str]:
    """Round ``round_``'s Poisson sample of ``names`` (in their order): each kept with probability ``rate``."""
    keep = np.random.default_rng([seed, round_, 0xFEDA]).random(len(names)) < rate
    return [n for n, k in zip(names, keep, strict=True) if k]


class Federated(Strategy):
    name = "federated"
    params_type = FederatedParams
    uses_server = True
    joins_from = "server"
    driver_state = ("round_", "dp", "planned", "history", "noise_key", "dropped", "passes")

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
            self.dropped = 0  # clients lost in rounds (after masking, or failing mid-round)
            self.passes = 0  # DP-SGD: the most passes a client made over its data
            if p.private:
                self.planned = p.rounds or math.ceil(run.config.steps / (p.sample_rate * p.local_steps))
                self.dp = p.dp().resolve(len(run.live()) * p.clients_per_node, p.sample_rate, self.planned)
            run.maybe_eval()
        audit = AuditLog(run.out / "audit.jsonl") if run.out is not None else None
        if audit is not None and run.resumed:
            audit.append(event="resume", round=self.round_)  # the rounds after it run, and are logged, again
        config_hash = digest({"strategy": dataclasses.asdict(p), "seed": run.config.seed})

        def on_join(n: Node, at: float) -> None:
            run.fetch_from_server(n)

        def more() -> bool:
            if p.rounds is not None:
                return self.round_ < p.rounds
            return run.tokens < run.budget and (self.planned is None or self.round_ < self.planned)

        while more():
            run.apply_churn(run.now, on_join, regroup_on_leave=True)
            live = run.live()
            if not live:
                break
            names = sorted(c for n in live for c in p.client_names(n.name))
            chosen = sample_clients(run.config.seed, self.round_, names, p.sample_rate)
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
                outcome = self._round(run, chosen, len(names))
            except (ray.exceptions.RayError, FabricError) as exc:
                gone = {n.name for n in run.lost(exc, "federated round")}
                run.regroup()
                lost = [c for c in chosen if p.host(c) in gone]
                self.dropped += len(lost)
                if audit is not None:
                    audit.append(
                        round=self.round_ - 1, participants=chosen, dropouts=lost, completed=False,
                        epsilon=epsilon,
                    )  # fmt: skip
                continue
            if epsilon is not None:
                run.metrics[-1]["epsilon"] = epsilon
            self.dropped += len(outcome["dropped"])
            if audit is not None:
                audit.append(
                    round=self.round_ - 1, participants=chosen, dropouts=outcome["dropped"],
                    completed=outcome["aborted"] is None, aborted=outcome["aborted"], secagg=p.secagg,
                    clip=p.clip, noise_multiplier=self.dp.noise_multiplier if self.dp else None,
                    sample_rate=p.sample_rate, epsilon=epsilon, delta=self.dp.delta if self.dp else None,
                    model_hash=outcome["model_hash"], config_hash=config_hash,
                )  # fmt: skip
            if outcome["dropped"]:
                run.regroup()
            run.maybe_eval()

    def _round(self, run: Run, chosen: list[str], population: int) -> dict[str, Any]:
        """One round of the sampled clients ``chosen`` (of ``population``): {"model_hash": the new global
        model's SHA-256 (None when the round changed nothing), "dropped": clients lost after masking,
        "aborted": why the round's sum was not applied, or None}."""
        p = self.params
        assert isinstance(p, FederatedParams)
        hosted: dict[str, list[int]] = {}  # node -> the indices of its sampled clients
        for c in chosen:
            hosted.setdefault(p.host(c), []).append(p.index(c))
        nodes = [run.nodes[name] for name in sorted(hosted)]
        # the server drops what a failed round left in its sum; the clients keep the global model
        run.call([run.server.op.remote("begin_round"), *(n.actor.op.remote("begin_round") for n in nodes)],
                 "round start")  # fmt: skip
        # DP-FedAvg (McMahan et al. 2018): clipped updates, each weighted 1 / (q N) (N: the live clients, q N
        # the expected sample), so one client moves the sum by at most clip / (q N); the noise on the sum has
        # standard deviation z clip / (q N). Without DP the weights are the clients' token shares (equal:
        # every client trains local_steps batches of the same size).
        weight = 1 / (p.sample_rate * population) if self.dp is not None else 1 / max(len(chosen), 1)
        results = run.call(
            [n.actor.op.remote("train", hosted[n.name], p.local_steps, p.mu, weight, p.clip) for n in nodes],
            "local training",
        )
        losses, norms = [], []
        for n, r in zip(nodes, results, strict=True):
            n.steps += r["steps"]
            n.tokens += r["tokens"]
            run.tokens += r["tokens"]
            losses += r["losses"]
            norms += r["norms"]
            self.passes = max(self.passes, r["passes"])
        sigma = 0.0  # the noise on the sum
        if self.dp is not None:
            assert self.dp.noise_multiplier is not None
            sigma = self.dp.noise_multiplier * self.dp.clip * weight
        info: dict[str, Any] = {"dropped": [], "aborted": None}
        if p.secagg:
            if len(nodes) < 2:
                upload = 0.0
                info["aborted"] = (
                    f"secure aggregation needs 2 or more nodes with clients; {len(nodes)} sampled"
                )
            else:
                upload, info = self._secure_upload(run, nodes, hosted, weight, sigma)
                info["dropped"] = [c for c in chosen if p.host(c) in set(info["dropped"])]
            server_noise = 0.0  # the clients added it
        else:
            upload, arrived = self._uploads(
                run,
                nodes,
                lambda n, dst: n.actor.op.remote("push_update", p.codec, dst),
                lambda to, src, names: to.op.remote(
                    "pull_update", src, p.codec, "acc" if names is not None else "partial"
                ),
            )
            gone = {n.name for n in nodes} - set(arrived)
            info = {
                "dropped": [c for c in chosen if p.host(c) in gone],
                "aborted": None,
                "survivors": arrived,
            }
            if not arrived and nodes:
                info["aborted"] = "no update reached the server"
            server_noise = sigma
        model_hash = None
        scale = 1.0
        if self.dp is None and len(info.get("survivors", nodes)) < len(nodes):  # re-weight to the survivors
            scale = len(chosen) / sum(len(hosted[name]) for name in info["survivors"])
        if info["aborted"] is None:
            [model_hash] = run.call(
                [run.server.op.remote("apply_round", server_noise, [self.noise_key, self.round_], scale)],
                "server update",
            )
        else:
            run.progress(f"  round {self.round_ - 1}: not applied: {info['aborted']}")
        down = []
        for n in run.live():
            rank = run.rank(n.name) + 1
            down.append(
                run.call(
                    [run.server.send_params.remote(rank), n.actor.recv_params.remote(0)], "model download"
                )
            )
        # a node trains its sampled clients one after the other
        compute = p.local_steps * max(
            (run.compute_s(n.name) * len(hosted[n.name]) for n in nodes), default=0.0
        )
        run.now += compute + upload + max(run.account(parts) for parts in down)
        loss = float(np.mean(losses)) if losses else float("nan")
        extra: dict[str, Any] = {k: info[k] for k in ("secagg_client_ms", "secagg_server_ms") if k in info}
        if self.dp is None and norms:  # a statistic of the clients' updates: released only without DP
            extra["update_norm"] = float(np.median(norms))
        run.record(
            "round", None, clients=chosen, loss=loss, dropped=info["dropped"],
            aborted=info["aborted"], **extra,
        )  # fmt: skip
        return {"model_hash": None if model_hash is None else str(model_hash), **info}

    def _uploads(
        self,
        run: Run,
        nodes: list[Node],
        send: Callable[[Node, int], Any],
        pull: Callable[[Any, int, Any], Any],
    ) -> tuple[float, list[str]]:
        """Bring every node's vector to the server, straight or (``hierarchical``) summed at its region's first
        node, which forwards one vector. ``send(node, dst_rank)`` and ``pull(receiver, src_rank, names)``
        make the remote calls of one transfer (``names``: the nodes whose vectors the message sums when the
        receiver is the server, None for an aggregator). One sender at a time into a receiver; modelled as
        parallel within each hop (the receiver's port queueing is not modelled). A node that dies is left
        out. Returns (modelled seconds, the nodes whose vectors reached the server)."""
        p = self.params
        assert isinstance(p, FederatedParams)
        groups: dict[str, list[Node]] = {}
        for n in nodes:
            groups.setdefault(run.topology.nodes[n.name].region if p.hierarchical else n.name, []).append(n)
        arrived: list[str] = []
        times = []
        for members in groups.values():
            head, gathered, hop = members[0], [members[0].name], 0.0
            for m in members[1:]:
                try:
                    parts = run.call([send(m, run.rank(head.name) + 1), pull(head.actor, run.rank(m.name) + 1, None)],
                                     "update upload (to the region's aggregator)")  # fmt: skip
                except (ray.exceptions.RayError, FabricError) as exc:
                    run.lost(exc, "update upload (to the region's aggregator)")
                    if not head.alive:
                        break
                    continue
                hop = max(hop, run.account(parts))
                gathered.append(m.name)
            if not head.alive:
                continue
            try:
                parts = run.call(
                    [send(head, 0), pull(run.server, run.rank(head.name) + 1, gathered)], "update upload"
                )
            except (ray.exceptions.RayError, FabricError) as exc:
                run.lost(exc, "update upload")
                continue
            times.append(hop + run.account(parts))
            arrived += gathered
        return max(times, default=0.0), arrived

    def _secure_upload(
        self, run: Run, nodes: list[Node], hosted: dict[str, list[int]], weight: float, sigma: float
    ) -> tuple[float, dict[str, Any]]:
        """The nodes' updates (each the weighted sum of its sampled clients' clipped updates) reach the server
        under secure aggregation, the nodes being its participants (the message order of
        edgeray.federated.secagg.run_round). The key messages (adverts, sealed shares, reveals: a few hundred
        bytes per neighbour) go through Ray's control plane, charged to the ledger and the modelled clock with
        the link model; the masked updates (uint32, one per node) go through the fabric. Afterwards the
        server holds the unmasked sum (or nothing, when the round aborted). Returns (modelled seconds,
        {"dropped": nodes, "survivors": nodes, "aborted", "secagg_client_ms", "secagg_server_ms"})."""
        p = self.params
        assert isinstance(p, FederatedParams) and p.clip is not None
        ids = {n.name: run.rank(n.name) + 1 for n in nodes}  # SecAgg ids: the nodes' fabric ranks
        by_id = {cid: run.nodes[name] for name, cid in ids.items()}
        names = {cid: name for name, cid in ids.items()}
        numel = sum(q.numel() for q in run.eval_params)
        params = SecAggParams.make(self.round_ - 1, ids.values(), numel, graph_seed=run.config.seed,
                                   dropout=p.secagg_dropout)  # fmt: skip
        # With DP, every node adds its share of the noise: the sum of min_survivors or more of them has at
        # least the standard deviation sigma. A node's coordinates are quantised within its clients' weighted
        # clips plus 8 of its noise's standard deviations (clamped beyond: one coordinate in ~10^15).
        client_std = sigma / math.sqrt(p.min_survivors(len(nodes))) if sigma > 0 else 0.0
        bound = weight * p.clip * max(len(c) for c in hosted.values()) + 8 * client_std
        links = LinkModel(
            run.topology,
            seed=int(np.random.SeedSequence([run.config.seed, self.round_]).generate_state(1)[0]),
        )
        control = 0.0  # modelled seconds of the key messages
        client_ms = dict.fromkeys(by_id, 0.0)
        server_ms = 0.0

        def charge(messages: dict[int, Any], upward: bool) -> None:
            """Ledger rows and modelled time of one message per client (to the server, or from it)."""
            nonlocal control
            parts = []
            for cid, message in messages.items():
                assert run.server_node is not None
                a, b = (by_id[cid].name, run.server_node) if upward else (run.server_node, by_id[cid].name)
                ledger = Ledger()
                ledger.record("secagg-keys", "control", links.transfer(a, b, _wire_bytes(message)), 0.0)
                parts.append(ledger.rows())
            control += run.account(parts)

        def clients(op: str, args: Callable[[int], tuple[Any, ...]], what: str) -> dict[int, Any]:
            results = run.call([by_id[c].actor.op.remote(op, *args(c)) for c in by_id], what)
            out = {}
            for c, (value, ms) in zip(list(by_id), results, strict=True):
                client_ms[c] += ms
                out[c] = value
            return out

        def server(op: str, *args: Any) -> Any:
            nonlocal server_ms
            [(value, ms)] = run.call([run.server.op.remote(op, *args)], f"secagg {op}")
            server_ms += ms
            return value

        adverts = clients("secagg_advertise", lambda c: (params, c), "secagg adverts")
        charge(adverts, upward=True)
        routed = server("secagg_begin", params, list(adverts.values()))
        charge(routed, upward=False)
        shares = clients("secagg_share", lambda c: (routed[c],), "secagg key sharing")
        charge(shares, upward=True)
        outbox = server("secagg_route", shares)
        charge(outbox, upward=False)
        clients("secagg_receive", lambda c: (outbox.get(c, []),), "secagg key sharing")

        drill = math.floor(p.drop_after_masking * len(nodes) + 1e-9)
        if drill:  # the drill: these clients die now, after sharing their keys
            rng = np.random.default_rng([run.config.seed, self.round_, 0xD409])
            for cid in sorted(rng.choice(sorted(by_id), size=drill, replace=False).tolist()):
                run.leave(by_id.pop(cid), run.now, "dropped after masking (drill)")
        clients("secagg_mask", lambda c: (bound, len(nodes), client_std), "masking")  # in parallel
        upload, _ = self._uploads(
            run,
            list(by_id.values()),
            lambda n, dst: n.actor.op.remote("secagg_send", dst),
            lambda to, src, names: (
                to.op.remote("secagg_pull", src, [ids[x] for x in names])
                if names is not None
                else to.op.remote("secagg_gather", src)
            ),
        )
        survivors, gone = server("secagg_roster")
        reveals = []
        for cid in sorted(survivors):
            client = by_id[cid]
            if not client.alive:
                continue
            try:
                [(reveal, ms)] = run.call(
                    [client.actor.op.remote("secagg_reveal", survivors, gone)], "secagg unmasking"
                )
            except (ray.exceptions.RayError, FabricError) as exc:
                run.lost(exc, "secagg unmasking")  # its input is in the sum: the others rebuild its seed
                continue
            client_ms[cid] += ms
            reveals.append(reveal)
        charge({r.src: r for r in reveals}, upward=True)
        min_survivors = p.min_survivors(len(nodes)) if sigma > 0 else 1
        aborted = server("secagg_finish", reveals, bound, len(nodes), min_survivors)
        return control + upload, {  # dropped: every node whose masked vector is not in the sum
            "dropped": [names[c] for c in sorted(names) if c not in survivors], "aborted": aborted, "survivors": [names[c] for c in sorted(survivors)],
            "secagg_client_ms": float(np.mean(list(client_ms.values()))), "secagg_server_ms": server_ms,
        }  # fmt: skip

    def summary(self, run: Run) -> dict[str, Any]:
        p = self.params
        assert isinstance(p, FederatedParams)
        rounds = [m for m in run.metrics if m["event"] == "round"]
        out: dict[str, Any] = {
            "rounds": len(rounds),
            "clients_per_round": float(np.mean([len(m["clients"]) for m in rounds])) if rounds else 0.0,
            "dropped": self.dropped,
            "aborted_rounds": sum(1 for m in rounds if m.get("aborted")),
            "secagg": p.secagg,
        }
        if p.dp_sgd_noise is not None:
            out.update(
                example_epsilon=example_epsilon(p.dp_sgd_noise, self.passes, p.dp_sgd_delta),
                example_delta=p.dp_sgd_delta, example_passes=self.passes,
            )  # fmt: skip
        for key in ("secagg_client_ms", "secagg_server_ms"):
            values = [m[key] for m in rounds if key in m]
            out[key] = float(np.mean(values)) if values else None
        if self.dp is not None:
            assert self.dp.delta is not None
            out.update(
                epsilon=Accountant(self.history).epsilon(self.dp.delta), delta=self.dp.delta,
                noise_multiplier=self.dp.noise_multiplier, clip=self.dp.clip, dp_history=self.history,
                planned_rounds=self.planned,
            )  # fmt: skip
        return out

    # ------------------------------------------------------------------ the model
    def prepare_model(self, model: Any, seed: int) -> tuple[Any, list[torch.nn.Parameter]]:
        p = self.params
        assert isinstance(p, FederatedParams)
        if p.lora_rank == 0:
            return model, list(model.parameters())
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in p.lora_targets.split(",") if t.strip()]
        names = {name.rpartition(".")[2] for name, _ in model.named_modules()}
        missing = sorted(set(targets) - names)
        if missing:
            raise StrategyError(
                f"federated: lora_targets {missing} are not modules of the model; it has e.g. "
                f"{sorted(n for n in names if n.endswith('proj'))}"
            )
        with torch.random.fork_rng():  # the adapters' random init, the same in every process
            torch.manual_seed(seed)
            config = LoraConfig(
                r=p.lora_rank, lora_alpha=p.lora_alpha, target_modules=targets, lora_dropout=0.0
            )
            model = get_peft_model(model, config)
        return model, [q for q in model.parameters() if q.requires_grad]

    def export_model(self, model: Any) -> Any:
        p = self.params
        assert isinstance(p, FederatedParams)
        if p.lora_rank == 0:
            return model
        return copy.deepcopy(model).merge_and_unload()  # the base with the adapters folded in

    # ------------------------------------------------------------------ worker (and server) side
    def setup_worker(self, worker: SyncWorker) -> None:
        worker.extra["global"] = None  # a client: the global model at the round's start
        worker.extra["partial"] = None  # a client node: its sampled clients' weighted, clipped updates summed
        worker.extra["acc"] = None  # the server: the round's summed weighted updates
        worker.extra["client_steps"] = {}  # virtual client -> local steps it has trained (its data position)
        worker.extra["shards"] = {}  # virtual client -> its windows (read from its file when first sampled)

    def op_begin_round(self, worker: SyncWorker) -> list[dict[str, Any]]:
        worker.extra["global"] = flat(worker.params)
        worker.extra["acc"] = worker.extra["partial"] = None
        return worker.rows()

    def op_train(
        self, worker: SyncWorker, clients: list[int], local_steps: int, mu: float, weight: float,
        clip: float | None,
    ) -> dict[str, Any]:  # fmt: skip
        """Each of this node's sampled ``clients`` in turn: from the global model, ``local_steps`` optimizer
        steps on its own shard (FedProx's mu (w - w_global) added to the gradient when mu > 0); its update
        w - w_global, clipped to L2 norm ``clip`` when given, times ``weight``, is added to the node's sum."""
        p = self.params
        assert isinstance(p, FederatedParams)
        w0 = worker.extra["global"]
        node_shard, node_steps = worker.shard, worker.steps
        partial = torch.zeros_like(w0)
        losses, steps, tokens, norms = [], 0, 0, []
        for c in clients:
            if p.clients_per_node > 1:  # a virtual client: its own data position, a fresh optimizer
                if c not in worker.extra["shards"]:
                    assert worker.data_dir is not None, "the server holds no data"
                    worker.extra["shards"][c] = read_client_shard(
                        worker.data_dir, worker.node, p.clients_per_node, c
                    )
                worker.shard, worker.steps = worker.extra["shards"][c], worker.extra["client_steps"].get(c, 0)
                worker.optimizer.state.clear()
                unflat_(w0, worker.params)
            try:
                for _ in range(local_steps):
                    if p.dp_sgd_noise is not None:
                        losses.append(self._dp_sgd_step(worker))
                        assert worker.shard is not None
                        tokens += worker.config.batch_size * (worker.shard.shape[1] - 1)
                        steps += 1
                        continue
                    r = worker.compute()
                    grad = worker.grad
                    assert grad is not None
                    if mu > 0:
                        grad = grad + mu * (flat(worker.params) - w0)
                    worker.apply(grad)
                    losses.append(r["loss"])
                    tokens += r["tokens"]
                    steps += 1
            finally:
                if p.dp_sgd_noise is not None and worker.shard is not None:  # passes over the client's
                    size = len(worker.shard)  # data: its DP-SGD compositions
                    passes = -(-worker.steps * worker.config.batch_size // size)
                    worker.extra["passes"] = max(worker.extra.get("passes", 0), passes)
                if p.clients_per_node > 1:
                    worker.extra["client_steps"][c] = worker.steps
                    worker.shard, worker.steps = node_shard, node_steps
            update = flat(worker.params) - w0
            norms.append(float(update.norm()))
            if clip is not None:
                update = update * min(1.0, clip / max(float(update.norm()), 1e-30))
            partial += weight * update
        if p.clients_per_node > 1:
            worker.steps += steps
        worker.extra["partial"] = partial
        return {
            "losses": losses, "steps": steps, "tokens": tokens, "norms": norms,
            "passes": worker.extra.get("passes", 0),
        }  # fmt: skip

    def _dp_sgd_step(self, worker: SyncWorker) -> float:
        """One DP-SGD step (Opacus) on the current client's next batch; returns its loss."""
        p = self.params
        assert isinstance(p, FederatedParams) and p.dp_sgd_noise is not None and worker.shard is not None
        if "dp_sgd" not in worker.extra:
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            worker.extra["dp_sgd"] = (
                GradSampleModule(worker.model),
                # the noise from a generator seeded by the OS's entropy: torch's global one is in the same
                # (public, seeded) state in every worker (Opacus's secure_mode needs torchcsprng, which has
                # no build for this Python)
                DPOptimizer(worker.optimizer, noise_multiplier=p.dp_sgd_noise, max_grad_norm=p.dp_sgd_clip,
                            expected_batch_size=worker.config.batch_size,
                            generator=torch.Generator().manual_seed(secrets.randbits(63))),
            )  # fmt: skip
        from edgeray.train.sync import lm_loss  # the runtime imports the strategies

        model, optimizer = worker.extra["dp_sgd"]
        b = worker.config.batch_size
        batch = worker.shard[[(worker.steps * b + i) % len(worker.shard) for i in range(b)]]
        optimizer.zero_grad()
        loss = lm_loss(model, batch)
        loss.backward()
        optimizer.step()  # per-example clipping, noise, averaging, then the client's optimizer step
        worker.steps += 1
        return float(loss)

    def op_push_update(self, worker: SyncWorker, codec: str = "none", dst: int = 0) -> list[dict[str, Any]]:
        """Send this node's summed client updates to rank ``dst`` (0: the server; else a region's aggregator)."""
        EdgeGroup.get(worker.server_group()).send_to(worker.extra["partial"], dst, codec)
        return worker.rows()

    def op_pull_update(
        self, worker: SyncWorker, src: int, codec: str = "none", into: str = "acc"
    ) -> list[dict[str, Any]]:
        """Receive an update from rank ``src`` and add it to ``into`` ("acc": the server's round sum;
        "partial": a region aggregator's own sum, forwarded later)."""
        buf = EdgeGroup.get(worker.server_group()).recv_from(torch.empty(worker.numel), src, codec)
        acc = worker.extra[into]
        worker.extra[into] = buf.clone() if acc is None else acc + buf
        return worker.rows()

    # secure aggregation: each op returns its result and the milliseconds it computed
    def op_secagg_advertise(self, worker: SyncWorker, params: SecAggParams, cid: int) -> tuple[Any, float]:
        t0 = time.perf_counter()
        client = worker.extra["secagg"] = SecAggClient(cid, params)
        return client.advertise(), _ms(t0)

    def op_secagg_share(self, worker: SyncWorker, adverts: dict[int, Any]) -> tuple[Any, float]:
        """(commitment to the self-mask seed, the sealed shares for each neighbour), ms."""
        t0 = time.perf_counter()
        return worker.extra["secagg"].share_keys(adverts), _ms(t0)

    def op_secagg_receive(self, worker: SyncWorker, sealed: list[Any]) -> tuple[None, float]:
        t0 = time.perf_counter()
        worker.extra["secagg"].receive(sealed)
        return None, _ms(t0)

    def op_secagg_mask(
        self, worker: SyncWorker, bound: float, clients: int, noise_std: float
    ) -> tuple[None, float]:
        """Add this node's share of the DP noise (``noise_std``) to its summed client updates, quantise them
        within ``bound`` for ``clients`` participants and mask them (kept until sent). The noise and the
        rounding draw from the OS's entropy: nobody else can take them back out."""
        t0 = time.perf_counter()
        x = worker.extra["partial"].double().numpy()
        rng = np.random.default_rng()
        if noise_std > 0:
            x = x + rng.normal(0.0, noise_std, x.shape)
        worker.extra["masked"] = worker.extra["secagg"].masked_input(quantize_bounded(x, bound, clients, rng))
        return None, _ms(t0)

    def op_secagg_send(self, worker: SyncWorker, dst: int) -> list[dict[str, Any]]:
        """Send the masked vector (this node's, or a region's sum of them) to rank ``dst``."""
        masked = worker.extra.pop("masked")
        EdgeGroup.get(worker.server_group()).send_raw(
            torch.from_numpy(masked.view(np.int32)), dst, "secagg"
        )()
        return worker.rows()

    def op_secagg_gather(self, worker: SyncWorker, src: int) -> list[dict[str, Any]]:
        """A region's aggregator: add the masked vector of rank ``src`` to its own (mod 2^32)."""
        y = EdgeGroup.get(worker.server_group()).recv_raw((worker.numel,), torch.int32, src, "secagg")
        worker.extra["masked"] = worker.extra["masked"] + y.numpy().view(np.uint32)
        return worker.rows()

    def op_secagg_reveal(
        self, worker: SyncWorker, survivors: set[int], dropped: set[int]
    ) -> tuple[Any, float]:
        t0 = time.perf_counter()
        reveal = worker.extra["secagg"].unmask(survivors, dropped)
        worker.extra["secagg"] = None
        return reveal, _ms(t0)

    def op_secagg_begin(
        self, worker: SyncWorker, params: SecAggParams, adverts: list[Any]
    ) -> tuple[Any, float]:
        """The server: a new round's SecAgg state; each client's neighbours' adverts."""
        t0 = time.perf_counter()
        server = worker.extra["secagg"] = SecAggServer(params)
        return server.collect_adverts(adverts), _ms(t0)

    def op_secagg_route(
        self, worker: SyncWorker, shares: dict[int, tuple[bytes, list[Any]]]
    ) -> tuple[Any, float]:
        t0 = time.perf_counter()
        server = worker.extra["secagg"]
        for cid, (commitment, sealed) in shares.items():
            server.collect_shares(cid, commitment, sealed)
        return {cid: server.sealed_for(cid) for cid in shares}, _ms(t0)

    def op_secagg_pull(self, worker: SyncWorker, src: int, cids: list[int]) -> list[dict[str, Any]]:
        """The server: a masked vector (or a region's sum of them: the clients ``cids``) from rank ``src``."""
        y = EdgeGroup.get(worker.server_group()).recv_raw((worker.numel,), torch.int32, src, "secagg")
        t0 = time.perf_counter()
        worker.extra["secagg"].add_sum(cids, y.numpy().view(np.uint32))
        worker.extra["pull_ms"] = worker.extra.get("pull_ms", 0.0) + _ms(t0)
        return worker.rows()

    def op_secagg_roster(self, worker: SyncWorker) -> tuple[tuple[set[int], set[int]], float]:
        return worker.extra["secagg"].roster(), 0.0

    def op_secagg_finish(
        self, worker: SyncWorker, reveals: list[Any], bound: float, clients: int, min_survivors: int
    ) -> tuple[str | None, float]:
        """The server: unmask the sum and keep it as the round's update, or say why the round is aborted."""
        t0 = time.perf_counter() - worker.extra.pop("pull_ms", 0.0) / 1e3  # the sums' time counts too
        server, worker.extra["secagg"] = worker.extra["secagg"], None
        survivors, _ = server.roster()
        if len(survivors) < min_survivors:
            return (
                f"{len(survivors)} of {clients} clients survived; the DP noise needs {min_survivors} "
                "(each survivor adds its share)"
            ), _ms(t0)
        try:
            total = server.unmask(reveals)
        except SecAggAbort as exc:
            return str(exc), _ms(t0)
        worker.extra["acc"] = torch.from_numpy(dequantize(total, bound, clients, len(survivors))).float()
        return None, _ms(t0)

    def op_apply_round(
        self, worker: SyncWorker, noise_std: float = 0.0, noise_seed: Any = None, scale: float = 1.0
    ) -> str:
        """The server: move the global model by the round's update times ``scale``, plus Gaussian noise of
        ``noise_std`` when DP is on, with the server optimizer; returns the new model's SHA-256."""
        p = self.params
        assert isinstance(p, FederatedParams)
        w = flat(worker.params)
        update = worker.extra["acc"] if worker.extra["acc"] is not None else torch.zeros_like(w)
        worker.extra["acc"] = None
        if scale != 1.0:
            update = update * scale
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
        # FedAdam's moments (the server), the virtual clients' data positions (a client node)
        return {k: worker.extra[k] for k in ("m", "v", "client_steps") if k in worker.extra}

    def load_worker_state(self, worker: SyncWorker, state: dict[str, Any]) -> None:
        worker.extra.update(state)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _wire_bytes(message: Any) -> int:
    """Bytes of a secure-aggregation message in a compact binary encoding: its byte strings, 8 per small
    integer, the field elements (Shamir shares) at their byte length."""
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, bool) or message is None:
        return 1
    if isinstance(message, int):
        return max(8, (message.bit_length() + 7) // 8)
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return sum(_wire_bytes(getattr(message, f.name)) for f in dataclasses.fields(message))
    if isinstance(message, dict):
        return sum(_wire_bytes(k) + _wire_bytes(v) for k, v in message.items())
    if isinstance(message, list | tuple | set):
        return sum(_wire_bytes(v) for v in message)
    raise TypeError(f"no wire size for {type(message).__name__}")

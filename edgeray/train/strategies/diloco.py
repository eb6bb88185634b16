"""DiLoCo (Douillard et al. 2023): ``h`` inner optimizer steps inside each region (gradients all-reduced in
the region), then an outer Nesterov SGD step on the pseudo-gradient (global minus local parameters)
averaged hierarchically across regions, optionally through a codec.

With ``fit`` (the default), a round lasts ``h`` inner steps of the fastest region and a slower region runs
the inner steps that fit in that window (at least one); each worker's pseudo-gradient is weighted by its
share of the round's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from edgeray.fabric.backend import FabricError
from edgeray.fabric.codecs import CODECS
from edgeray.fabric.collectives import hierarchical_allreduce
from edgeray.train.strategies.base import Params, Strategy, SyncError, flat, region_step, unflat_

if TYPE_CHECKING:
    from edgeray.train.sync import Node, Run, SyncWorker


@dataclass(frozen=True)
class DiLoCoParams(Params):
    h: int = 20
    """Inner steps per round (of the fastest region)."""
    fit: bool = True
    """Slower regions run the inner steps that fit in the fastest region's round (else every region runs h)."""
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    """Nesterov momentum of the outer SGD (0 = plain SGD)."""
    codec: str = "none"
    """Codec on the inter-region hops of the outer all-reduce (see edgeray.fabric.codecs)."""

    def problems(self) -> list[str]:
        return outer_problems(self.h, self.outer_lr, self.outer_momentum, self.codec)


def outer_problems(h: int, outer_lr: float, outer_momentum: float, codec: str) -> list[str]:
    """Checks of the hyperparameters every DiLoCo variant has."""
    out = []
    if h < 1:
        out.append(f"h = {h}: must be >= 1")
    if not outer_lr > 0:
        out.append(f"outer_lr = {outer_lr}: must be > 0")
    if not 0 <= outer_momentum < 1:
        out.append(f"outer_momentum = {outer_momentum}: must be in [0, 1)")
    if codec not in CODECS:
        out.append(f"codec = {codec!r}: valid codecs are {sorted(CODECS)}")
    return out


class DiLoCo(Strategy):
    name = "diloco"
    params_type = DiLoCoParams
    copies_optimizer_state = True
    driver_state = ("round_",)

    def run(self, run: Run) -> None:
        p = self.params
        assert isinstance(p, DiLoCoParams)
        if not run.resumed:
            run.regroup()
            run.maybe_eval()
            self.round_ = 0

        def on_join(n: Node, at: float) -> None:
            run.fetch_from_peer(n, at)

        while run.tokens < run.budget:
            run.apply_churn(run.now, on_join, regroup_on_leave=True)
            start = run.now
            regions: dict[str, list[Node]] = {}
            for n in run.live():
                regions.setdefault(run.topology.nodes[n.name].region, []).append(n)
            clock = dict.fromkeys(regions, 0.0)
            last = dict.fromkeys(regions, 0.0)
            round_tokens = {n.name: 0 for n in run.live()}
            window = math.inf
            i = 0
            while True:
                if i == 0:
                    active = list(regions)
                else:
                    active = [
                        r
                        for r in regions
                        if (i < p.h if not p.fit else clock[r] + last[r] <= window * (1 + 1e-9))
                    ]
                room = run.budget - run.tokens  # never past the token budget: regions that fit, in order
                fitting = []
                for r in active:
                    if len(regions[r]) * run.tokens_per_step <= room:
                        fitting.append(r)
                        room -= len(regions[r]) * run.tokens_per_step
                active = fitting
                if not active:
                    break
                members = [n for r in active for n in regions[r]]
                try:
                    results, parts = region_step(run, members, regions)
                except (ray.exceptions.RayError, FabricError) as exc:
                    run.lost(exc, "DiLoCo inner step")
                    run.regroup()
                    # Redo this inner step with the round's survivors. (A region whose own all-reduce
                    # completed before the failure surfaced keeps that step, uncounted.)
                    regions = {r: [n for n in ns if n.alive] for r, ns in regions.items()}
                    regions = {r: ns for r, ns in regions.items() if ns}
                    if not regions:
                        raise SyncError("every worker has left: nothing can train") from exc
                    continue
                by_node = dict(zip([n.name for n in members], zip(results, parts, strict=True), strict=True))
                for r in active:
                    comm = run.account([by_node[n.name][1] for n in regions[r]])
                    step = max(run.compute_s(n.name) for n in regions[r]) + comm
                    clock[r] += step
                    last[r] = step
                    for n in regions[r]:
                        tokens = by_node[n.name][0]["tokens"]
                        n.steps += 1
                        n.tokens += tokens
                        round_tokens[n.name] += tokens
                        run.tokens += tokens
                    run.record(
                        "inner",
                        None,
                        region=r,
                        round=self.round_,
                        step=i,
                        loss=float(np.mean([by_node[n.name][0]["loss"] for n in regions[r]])),
                    )
                if i == 0:
                    window = p.h * min(clock.values())
                i += 1
            live = run.live()  # every member takes part in the all-reduce; weight = its share of the tokens
            total = sum(round_tokens.get(n.name, 0) for n in live)
            if total == 0:
                break  # what is left of the budget is less than one region's step
            try:
                parts = run.call(
                    [n.actor.op.remote("outer", round_tokens.get(n.name, 0) / total) for n in live],
                    "outer all-reduce",
                )
            except (ray.exceptions.RayError, FabricError) as exc:
                run.lost(exc, "DiLoCo outer all-reduce")
                run.regroup()
                continue  # the survivors keep their inner progress and sync at the next round
            comm = run.account(parts)
            run.now = start + max(clock.values()) + comm
            run.record(
                "outer",
                None,
                round=self.round_,
                inner_steps={r: round(clock[r] / max(last[r], 1e-12)) for r in clock},
                comm_s=comm,
                outer_inter_region_bytes=sum(
                    r["bytes"] for rows in parts for r in rows if r["link_class"] == "inter-region"
                ),
            )
            self.round_ += 1
            run.maybe_eval()

    def summary(self, run: Run) -> dict[str, Any]:
        outer = [m for m in run.metrics if m["event"] == "outer"]
        return {
            "outer_syncs": len(outer),
            "peak_outer_inter_region_bytes": max((m["outer_inter_region_bytes"] for m in outer), default=0),
        }

    # ------------------------------------------------------------------ worker side
    def setup_worker(self, worker: SyncWorker) -> None:
        """The global (outer) parameters and the outer Nesterov SGD on them."""
        assert isinstance(self.params, DiLoCoParams)
        outer = torch.nn.Parameter(flat(worker.params))
        worker.extra["outer"] = outer
        worker.extra["outer_opt"] = torch.optim.SGD(
            [outer],
            lr=self.params.outer_lr,
            momentum=self.params.outer_momentum,
            nesterov=self.params.outer_momentum > 0,
        )

    def op_outer(self, worker: SyncWorker, weight: float) -> list[dict[str, Any]]:
        """Average the weighted pseudo-gradient (global - local parameters) over every worker, take the outer
        step on the global parameters and restart the inner loop from them."""
        assert worker.plan is not None and isinstance(self.params, DiLoCoParams)
        outer, outer_opt = worker.extra["outer"], worker.extra["outer_opt"]
        delta = (outer.detach() - flat(worker.params)) * weight
        hierarchical_allreduce(delta, worker.plan, worker.node, codec=self.params.codec)
        outer.grad = delta
        outer_opt.step()
        unflat_(outer.detach(), worker.params)
        return worker.rows()

    def extra_state(self, worker: SyncWorker) -> list[torch.Tensor]:
        outer, outer_opt = worker.extra["outer"], worker.extra["outer_opt"]
        buf = outer_opt.state.get(outer, {}).get("momentum_buffer")
        return [
            outer.detach().clone(),
            buf.reshape(-1).clone() if buf is not None else torch.zeros(worker.numel),
        ]

    def load_extra_state(self, worker: SyncWorker, parts: list[torch.Tensor]) -> None:
        assert isinstance(self.params, DiLoCoParams)
        outer, outer_opt = worker.extra["outer"], worker.extra["outer_opt"]
        outer.data.copy_(parts[0])
        if self.params.outer_momentum > 0 and bool(parts[1].abs().sum() > 0):
            outer_opt.state[outer] = {"momentum_buffer": parts[1].clone()}

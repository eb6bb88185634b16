"""Elastic averaging SGD (Zhang, Choromanska and LeCun 2015): workers train locally and, every ``period``
local steps, exchange with the server's center variable, each moving ``alpha`` of their difference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import torch

from edgeray.fabric.backend import EdgeGroup, FabricError
from edgeray.train.strategies.base import Events, Params, Strategy, flat, unflat_

if TYPE_CHECKING:
    from edgeray.train.sync import Node, Run, SyncWorker


@dataclass(frozen=True)
class EASGDParams(Params):
    alpha: float = 0.15
    """Elasticity: each exchange moves worker and center this fraction of their difference."""
    period: int = 4
    """Local steps between exchanges."""

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.alpha <= 1:
            out.append(f"alpha = {self.alpha}: must be in (0, 1]")
        if self.period < 1:
            out.append(f"period = {self.period}: must be >= 1")
        return out


class EASGD(Strategy):
    name = "easgd"
    params_type = EASGDParams
    uses_server = True
    joins_from = "server"
    driver_state = ("events", "server_clock")

    def run(self, run: Run) -> None:
        p = self.params
        assert isinstance(p, EASGDParams)
        if not run.resumed:
            run.regroup()
            run.maybe_eval()
            self.events = Events(run)
            self.server_clock = 0.0
        events = self.events

        def on_join(n: Node, at: float) -> None:
            events.push(at + run.fetch_from_server(n), "start", n.name)

        while run.tokens < run.budget and events:
            event = events.pop_live(on_join)
            if event is None:
                continue  # its node left (and maybe came back) since it was queued
            t, _, n = event
            name = n.name
            try:
                result = run.call([n.actor.compute.remote()], "compute")[0]
                run.call([n.actor.apply_local.remote()], "local step")
            except ray.exceptions.RayError as exc:
                run.lost(exc, "compute")
                continue
            done = t + run.compute_s(name)
            n.steps += 1
            n.tokens += result["tokens"]
            run.tokens += result["tokens"]
            ready = done
            if n.steps % p.period == 0:
                rank = run.rank(name) + 1
                try:
                    parts = run.call(
                        [n.actor.op.remote("exchange"), run.server.op.remote("center", rank)],
                        "elastic exchange",
                    )
                except (ray.exceptions.RayError, FabricError) as exc:
                    run.lost(exc, "elastic exchange")
                    continue
                self.server_clock = max(self.server_clock, done) + run.account(parts)
                ready = self.server_clock
            run.now = max(run.now, done)
            run.record("step", name, step=n.steps, loss=result["loss"])
            events.push(ready, "start", name)
            run.maybe_eval()

    def op_exchange(self, worker: SyncWorker) -> list[dict[str, Any]]:
        """Worker side: get the center, move toward it, send the move to the server."""
        assert isinstance(self.params, EASGDParams)
        group = EdgeGroup.get(worker.server_group())
        center = group.recv_from(torch.empty(worker.numel), 0)
        mine = flat(worker.params)
        diff = self.params.alpha * (mine - center)
        unflat_(mine - diff, worker.params)
        group.send_to(diff, 0)
        return worker.rows()

    def op_center(self, worker: SyncWorker, src: int) -> list[dict[str, Any]]:
        """Server side: send the center to ``src``, add the worker's move to it."""
        group = EdgeGroup.get(worker.server_group())
        group.send_to(flat(worker.params), src)
        diff = group.recv_from(torch.empty(worker.numel), src)
        unflat_(flat(worker.params) + diff, worker.params)
        return worker.rows()

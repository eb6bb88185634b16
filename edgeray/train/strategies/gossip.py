"""Gossip (AD-PSGD style, Lian et al. 2018): after each local step a worker averages its parameters with one
seeded-random live peer; nobody waits for anyone but that peer."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import ray

from edgeray.fabric.backend import EdgeGroup, FabricError
from edgeray.train.strategies.base import Events, Strategy, flat, unflat_

if TYPE_CHECKING:
    from edgeray.train.sync import Node, Run, SyncWorker


class Gossip(Strategy):
    name = "gossip"
    driver_state = ("events", "rng")

    def run(self, run: Run) -> None:
        if not run.resumed:
            self.rng = random.Random(run.config.seed)
            run.regroup()
            run.maybe_eval()
            self.events = Events(run)
        events, rng = self.events, self.rng
        push = events.push

        def on_join(n: Node, at: float) -> None:
            push(at + run.fetch_from_peer(n, at), "start", n.name)

        while run.tokens < run.budget and events:
            event = events.pop_live(on_join)
            if event is None:
                continue  # its node left (and maybe came back) since it was queued
            t, kind, n = event
            name = n.name
            try:
                if kind == "start":
                    n.last = run.call([n.actor.compute.remote()], "compute")[0]
                    push(t + run.compute_s(name), "gossip", name)
                    continue
                # the local step, then average with a random live peer
                run.call([n.actor.apply_local.remote()], "local step")
            except ray.exceptions.RayError as exc:
                run.lost(exc, "local step")
                continue
            n.steps += 1
            n.tokens += n.last["tokens"]
            run.tokens += n.last["tokens"]
            peers = [p for p in run.live() if p.name != name]
            seconds, peer_name = 0.0, None
            if peers:
                peer = rng.choice(peers)
                try:
                    parts = run.call(
                        [
                            n.actor.op.remote("average", run.rank(peer.name)),
                            peer.actor.op.remote("average", run.rank(name)),
                        ],
                        "gossip exchange",
                    )
                    seconds, peer_name = run.account(parts), peer.name
                except (ray.exceptions.RayError, FabricError) as exc:
                    run.lost(exc, "gossip exchange")  # the step stands; this round's averaging is lost
            run.record("step", name, step=n.steps, loss=n.last["loss"], peer=peer_name, comm_s=seconds)
            if n.alive:
                push(t + seconds, "start", name)
            run.maybe_eval()

    def op_average(self, worker: SyncWorker, peer_rank: int) -> list[dict[str, Any]]:
        """Swap parameters with ``peer_rank`` of the global group and keep the mean (both sides call this)."""
        assert worker.plan is not None
        mine = flat(worker.params)
        other = EdgeGroup.get(worker.plan.name("global")).pair_exchange(mine, peer_rank)
        unflat_((mine + other) * 0.5, worker.params)
        return worker.rows()

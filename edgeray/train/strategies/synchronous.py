"""Synchronous data parallelism: every step, every worker's gradient is averaged before anyone steps.

``sync``: one ring all-reduce over every worker. ``sync-hier``: reduce inside each region, ring among the
region leaders, broadcast back (optionally a codec on the inter-region hops). Both equal single-process
large-batch training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import ray

from edgeray.fabric.backend import FabricError
from edgeray.fabric.codecs import CODECS
from edgeray.train.strategies.base import Params, Strategy, SyncError

if TYPE_CHECKING:
    from edgeray.train.sync import Node, Run


class Synchronous(Strategy):
    """``sync``: flat ring all-reduce of gradients over every worker, each step."""

    name = "sync"
    copies_optimizer_state = True
    scope: ClassVar[str] = "global"
    driver_state = ("step",)

    def codec(self) -> str:
        return "none"

    def run(self, run: Run) -> None:
        scope, codec = self.scope, self.codec()
        if not run.resumed:
            run.regroup()
            run.maybe_eval()
            self.step = 0

        def on_join(n: Node, at: float) -> None:
            run.fetch_from_peer(n, at)

        while run.tokens < run.budget:
            run.apply_churn(run.now, on_join, regroup_on_leave=True)
            live = run.live()
            try:
                results = dict(
                    zip(
                        [n.name for n in live],
                        run.call([n.actor.compute.remote() for n in live], "compute"),
                        strict=True,
                    )
                )
            except ray.exceptions.RayError as exc:
                run.lost(exc, "compute")
                run.regroup()
                continue
            for attempt in range(3):
                try:
                    parts = run.call(
                        [n.actor.allreduce_step.remote(scope, 1.0 / len(live), codec) for n in live],
                        f"{scope} all-reduce",
                    )
                    break
                except (ray.exceptions.RayError, FabricError) as exc:  # a member died mid-collective
                    run.lost(exc, f"{scope} all-reduce")
                    if attempt == 2:
                        raise SyncError(f"{scope} all-reduce failed three times: {exc}") from exc
                    run.regroup()  # the survivors still hold their gradients: average those
                    live = run.live()
            step_compute = max(run.compute_s(n.name) for n in live)
            comm = run.account(parts)
            run.now += step_compute + comm
            for n in live:
                n.steps += 1
                n.tokens += results[n.name]["tokens"]
                run.tokens += results[n.name]["tokens"]
            self.step += 1
            loss = float(np.mean([results[n.name]["loss"] for n in live]))
            run.record(
                "step",
                None,
                step=self.step,
                loss=loss,
                workers=len(live),
                comm_s=comm,
                compute_s=step_compute,
            )
            run.maybe_eval()


@dataclass(frozen=True)
class HierParams(Params):
    codec: str = "none"
    """Codec on the leaders' (inter-region) hops (see edgeray.fabric.codecs)."""

    def problems(self) -> list[str]:
        return [] if self.codec in CODECS else [f"codec = {self.codec!r}: valid codecs are {sorted(CODECS)}"]


class Hierarchical(Synchronous):
    """``sync-hier``: the same average, reduced in each region, ring among leaders, broadcast back."""

    name = "sync-hier"
    params_type = HierParams
    scope = "hierarchical"

    def codec(self) -> str:
        assert isinstance(self.params, HierParams)
        return self.params.codec

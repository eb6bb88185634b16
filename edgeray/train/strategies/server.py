"""A parameter server: workers push gradients and pull parameters, nobody waits for anybody else.

``async``: the server applies each gradient as it arrives, its learning rate divided by the gradient's
staleness (staleness-aware asynchronous SGD, Zhang et al. 2016), optionally dropping gradients older than a
bound. ``ssp`` (stale synchronous parallel): the same, but a worker may start a step only while it is at
most ``bound`` steps ahead of the slowest live worker.

The server serializes its updates (its own clock), applying them in the order workers finish computing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import ray
import torch

from edgeray.fabric.backend import EdgeGroup, FabricError
from edgeray.train.strategies.base import Events, Params, Strategy, SyncError

if TYPE_CHECKING:
    from edgeray.train.sync import Node, Run, SyncWorker


@dataclass(frozen=True)
class AsyncParams(Params):
    staleness: int | None = None
    """Drop a gradient computed on parameters more than this many server versions old (None: never)."""
    staleness_lr: bool = True
    """Divide the server's learning rate by each gradient's staleness; without it, stale AdamW updates
    make the loss climb back."""

    def problems(self) -> list[str]:
        if self.staleness is not None and self.staleness < 0:
            return [f"staleness = {self.staleness}: must be >= 0 or None (unbounded)"]
        return []


@dataclass(frozen=True)
class SSPParams(Params):
    bound: int = 3
    """A worker may be at most this many steps ahead of the slowest live worker."""
    staleness_lr: bool = True

    def problems(self) -> list[str]:
        return [f"bound = {self.bound}: must be >= 0"] if self.bound < 0 else []


class ParameterServer(Strategy):
    """``async``: push the gradient to the server, pull its parameters; wait for the server only."""

    name = "async"
    params_type: ClassVar[type[Params]] = AsyncParams
    uses_server = True
    joins_from = "server"
    driver_state = ("events", "server_clock", "version", "blocked")

    def bound(self) -> int | None:
        """SSP's bound on how far ahead a worker may run (None: no bound)."""
        return None

    def drops(self, staleness: int) -> bool:
        p = self.params
        return isinstance(p, AsyncParams) and p.staleness is not None and staleness > p.staleness

    # ------------------------------------------------------------------ driver
    def run(self, run: Run) -> None:
        if not run.resumed:
            run.regroup()
            run.maybe_eval()
            self.events = Events(run)
            self.server_clock = 0.0
            self.version = 0  # updates the server has applied
            self.blocked: set[str] = set()  # SSP: workers waiting for the slowest
        events, blocked = self.events, self.blocked
        push = events.push
        bound = self.bound()

        def on_join(n: Node, at: float) -> None:
            seconds = run.fetch_from_server(n)
            n.version = self.version
            push(at + seconds, "start", n.name)

        while run.tokens < run.budget:
            if not events and blocked:  # whoever held them back has left: re-check against the live ones
                for b in sorted(blocked):
                    push(run.now, "start", b)
                blocked.clear()
            if not events:
                break
            event = events.pop_live(on_join)
            if event is None:
                continue  # its node left (and maybe came back) since it was queued
            t, kind, n = event
            name = n.name
            if kind == "start":
                if bound is not None:
                    slowest = min(m.steps for m in run.live())
                    if n.steps - slowest >= bound + 1:
                        blocked.add(name)  # resumes when the slowest worker's next update lands
                        run.record("wait", name, step=n.steps, ahead=n.steps - slowest, bound=bound)
                        continue
                    run.record("start", name, step=n.steps, ahead=n.steps - slowest, bound=bound)
                try:
                    n.last = run.call([n.actor.compute.remote()], "compute")[0]
                except ray.exceptions.RayError as exc:
                    run.lost(exc, "compute")
                    continue
                push(t + run.compute_s(name), "push", name)
            else:  # push: the gradient goes to the server, is applied (or dropped), the parameters come back
                rank = run.rank(name) + 1
                try:
                    up = run.call(
                        [n.actor.op.remote("push_grad", 0), run.server.op.remote("receive_grad", rank)],
                        "gradient push",
                    )
                except (ray.exceptions.RayError, FabricError) as exc:
                    run.lost(exc, "gradient push")
                    continue
                arrive = t + run.account(up)
                staleness = self.version - n.version
                drop = self.drops(staleness)
                self.server_clock = max(self.server_clock, arrive)
                self.version = run.call(
                    [run.server.op.remote("apply_pending", rank, drop, staleness)], "server update"
                )[0]
                down = run.call(
                    [run.server.send_params.remote(rank), n.actor.recv_params.remote(0)], "parameter pull"
                )
                ready = self.server_clock + run.account(down)
                n.version = self.version
                n.steps += 1
                tokens = n.last["tokens"]
                if not drop:
                    n.tokens += tokens
                    run.tokens += tokens
                run.now = max(run.now, self.server_clock)
                run.record(
                    "dropped" if drop else "update",
                    name,
                    step=n.steps,
                    loss=n.last["loss"],
                    staleness=staleness,
                    version=self.version,
                )
                push(ready, "start", name)
                for b in sorted(blocked):
                    blocked.discard(b)
                    push(self.server_clock, "start", b)
                run.maybe_eval()
        if run.tokens < run.budget:
            raise SyncError("no worker left to finish the token budget")

    def summary(self, run: Run) -> dict[str, Any]:
        stale = [m["staleness"] for m in run.metrics if m["event"] in ("update", "dropped")]
        return {
            "max_staleness": max(stale, default=0),
            "dropped": sum(1 for m in run.metrics if m["event"] == "dropped"),
        }

    # ------------------------------------------------------------------ worker (and server) side
    def setup_worker(self, worker: SyncWorker) -> None:
        worker.extra["version"] = 0  # server: updates applied
        worker.extra["pending"] = {}  # server: received gradients by worker rank

    def op_push_grad(self, worker: SyncWorker, dst: int = 0) -> list[dict[str, Any]]:
        assert worker.grad is not None
        EdgeGroup.get(worker.server_group()).send_to(worker.grad, dst)
        return worker.rows()

    def op_receive_grad(self, worker: SyncWorker, src: int) -> list[dict[str, Any]]:
        buf = torch.empty(worker.numel)
        worker.extra["pending"][src] = EdgeGroup.get(worker.server_group()).recv_from(buf, src)
        return worker.rows()

    def worker_state(self, worker: SyncWorker) -> dict[str, Any]:
        return {"version": worker.extra["version"]}  # "pending" is empty between driver events

    def load_worker_state(self, worker: SyncWorker, state: dict[str, Any]) -> None:
        worker.extra["version"] = state["version"]

    def op_apply_pending(self, worker: SyncWorker, src: int, drop: bool = False, staleness: int = 0) -> int:
        """Server: apply (or drop, when too stale) the gradient received from ``src``; returns the version."""
        grad = worker.extra["pending"].pop(src)
        if not drop:
            lr = worker.config.lr
            if getattr(self.params, "staleness_lr", False):
                lr = lr / max(1, staleness)
            for group in worker.optimizer.param_groups:
                group["lr"] = lr
            worker.apply(grad)
            worker.extra["version"] += 1
        return int(worker.extra["version"])


class StaleSynchronous(ParameterServer):
    """``ssp``: as ``async``, but a worker may run at most ``bound`` steps ahead of the slowest live one."""

    name = "ssp"
    params_type = SSPParams

    def bound(self) -> int | None:
        assert isinstance(self.params, SSPParams)
        return self.params.bound

    def summary(self, run: Run) -> dict[str, Any]:
        return {
            **super().summary(run),
            "max_ahead": max((m["ahead"] for m in run.metrics if m["event"] == "start"), default=0),
            "waits": sum(1 for m in run.metrics if m["event"] == "wait"),
        }

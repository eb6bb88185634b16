"""FabricWorker: an actor on one topology node that joins the topology's groups and runs collectives.

    w = pin(FabricWorker, node="campus-gw").remote(topology_path, "campus-gw", time_scale=1.0)
    ray.get([w.join.remote(plan) for w in workers], timeout=60)
    ray.get([w.run.remote("hierarchical", tensor) for w in workers], timeout=120)

Used by the fabric benchmark and tests; training actors (stages, experts, workers) install a Fabric and
join groups the same way.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import torch

from edgeray.fabric.backend import EdgeGroup, Fabric, FabricError, install
from edgeray.fabric.collectives import GroupPlan, flat_allreduce, gossip_average, hierarchical_allreduce, join
from edgeray.topology import load_topology


@ray.remote(num_cpus=0)
class FabricWorker:
    def __init__(
        self,
        topology_path: str,
        node: str,
        *,
        time_scale: float = 0.0,
        seed: int = 0,
        timeout_s: float = 60.0,
    ) -> None:
        self.node = node
        self.fabric = Fabric.from_topology(
            load_topology(topology_path), node=node, time_scale=time_scale, seed=seed, timeout_s=timeout_s
        )
        install(self.fabric)
        self.plan: GroupPlan | None = None

    def _plan(self) -> GroupPlan:
        if self.plan is None:
            raise FabricError(f"worker on {self.node} has joined no groups: call join(plan) first")
        return self.plan

    def join(self, plan: GroupPlan) -> list[str]:
        self.plan = plan
        return join(plan, self.node)

    def run(self, op: str, data: np.ndarray, **kwargs: Any) -> tuple[np.ndarray, float]:
        """Run collective ``op`` on ``data``; returns (result, measured seconds)."""
        plan = self._plan()
        tensor = torch.from_numpy(np.array(data, dtype=np.float32, copy=True))
        t0 = time.perf_counter()
        if op == "flat":
            flat_allreduce(tensor, plan, **kwargs)
        elif op == "hierarchical":
            hierarchical_allreduce(tensor, plan, self.node, **kwargs)
        elif op == "gossip":
            gossip_average(tensor, plan, **kwargs)
        elif op == "broadcast":
            EdgeGroup.get(plan.name("global")).broadcast_from(tensor, **kwargs)
        else:
            raise ValueError(f"unknown op {op!r}; valid: flat, hierarchical, gossip, broadcast")
        return tensor.numpy(), time.perf_counter() - t0

    def run_generated(
        self, op: str, numel: int, seed: int, *, check: bool = False, **kwargs: Any
    ) -> tuple[float, float | None]:
        """Like :meth:`run` on data made here from ``seed + rank`` (big tensors never cross the object
        store). With ``check``, also returns the relative error against the exact float64 sum."""
        plan = self._plan()
        rank = plan.nodes.index(self.node)
        data = np.random.default_rng(seed + rank).standard_normal(numel).astype(np.float32)
        out, seconds = self.run(op, data, **kwargs)
        if not check:
            return seconds, None
        exact = sum(
            np.random.default_rng(seed + r).standard_normal(numel).astype(np.float32).astype(np.float64)
            for r in range(len(plan.nodes))
        )
        return seconds, float(np.linalg.norm(out - exact) / np.linalg.norm(exact))

    def phase_clocks(self, op: str, numel: int, seed: int, codec: str = "none") -> list[float]:
        """Run ``op`` ("hierarchical" or "flat") on generated data (as :meth:`run_generated`) from a clock
        of 0; returns this process's clock after the reduce, the ring and the broadcast (a flat ring has
        one phase: its clock after the ring, three times). What jobs/calibrate_sim.py compares the
        simulator's phases with."""
        plan = self._plan()
        rank = plan.nodes.index(self.node)
        data = np.random.default_rng(seed + rank).standard_normal(numel).astype(np.float32)
        tensor = torch.from_numpy(data)
        self.fabric.clock = 0.0
        marks: list[float] = []
        if op == "hierarchical":
            hierarchical_allreduce(
                tensor, plan, self.node, codec, after_phase=lambda _: marks.append(self.fabric.clock)
            )
        elif op == "flat":
            flat_allreduce(tensor, plan, codec)
            marks = [0.0, self.fabric.clock, self.fabric.clock]
        else:
            raise ValueError(f"phase_clocks: op {op!r}; valid: hierarchical, flat")
        return marks

    def send(self, data: np.ndarray, dst: int, group: str = "global") -> None:
        EdgeGroup.get(self._plan().name(group)).send_to(
            torch.from_numpy(np.asarray(data, dtype=np.float32)), dst
        )

    def recv(self, numel: int, src: int, group: str = "global") -> np.ndarray:
        out = torch.empty(numel)
        EdgeGroup.get(self._plan().name(group)).recv_from(out, src)
        return out.numpy()

    def transports(self) -> dict[str, str]:
        """Payload transport ("gloo" or "nccl") of every group this worker joined, by plan group name."""
        plan = self._plan()
        return {
            m.group.removeprefix(plan.prefix): EdgeGroup.get(m.group).transport
            for m in plan.memberships(self.node)
        }

    def clock(self, set_to: float | None = None, compute_s: float = 0.0) -> float:
        """This process's modelled clock (see Fabric.clock), after setting it and charging ``compute_s``."""
        if set_to is not None:
            self.fabric.clock = set_to
        return self.fabric.compute(compute_s)

    def ledger_rows(self, clear: bool = True) -> list[dict[str, Any]]:
        rows = self.fabric.ledger.rows()
        if clear:
            self.fabric.ledger.clear()
        return rows

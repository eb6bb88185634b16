"""The driver's view of a MoE fleet: the trunk and every expert actor in one fabric group, failover to
standbys, checkpoints."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import torch

from edgeray.atomic import write_atomic
from edgeray.fabric.backend import FabricError
from edgeray.fabric.groups import RunGroups
from edgeray.fabric.ledger import Ledger
from edgeray.model.presets import PRESETS, save_pretrained
from edgeray.model.tokenizer import train_tokenizer
from edgeray.placement import reserve
from edgeray.topology import Topology
from edgeray.train.failures import WorkerFailed, dead_actors
from edgeray.train.failures import kind as failure_kind
from edgeray.train.moe.config import WAIT_S, ExpertsLost, MoEConfig, MoEError, build_moe_model
from edgeray.train.moe.experts import ExpertWorker
from edgeray.train.moe.placement import ExpertPlan
from edgeray.train.moe.trunk import TrunkWorker


# ------------------------------------------------------------------------------------------------- driver
class MoEFleet:
    """The trunk and one actor per expert on a connected cluster, joined in one fabric group."""

    def __init__(
        self,
        config: MoEConfig,
        topology: Topology,
        plan: ExpertPlan,
        data_dir: str | Path,
        init_dir: str | Path | None = None,
        progress: Callable[[str], None] = print,
    ) -> None:
        self.config, self.topology, self.plan, self.data_dir = config, topology, plan, str(data_dir)
        self.progress = progress
        self.groups = RunGroups("moe")
        self.ledger = Ledger()
        self.trunk: Any = None
        self.actors: list[list[Any]] = []
        """Each expert's actors, serving replica first (plan order)."""
        self.up: list[list[bool]] = []
        # the CPUs the trunk and every expert replica compute with, held until close (slot 0: the trunk)
        slots = [(plan.trunk, config.torch_threads)] + [
            (node, config.torch_threads) for e in range(config.experts) for node in plan.replica_nodes(e)
        ]
        self.reservation = reserve(slots, what=f"MoE run {self.groups.prefix}", progress=progress)
        try:
            self.start(init_dir)
        except BaseException:
            self.close()
            raise

    @property
    def alive(self) -> list[bool]:
        """Whether each expert still has a live replica."""
        return [any(up) for up in self.up]

    @property
    def experts(self) -> list[Any]:
        """The actor serving each expert now (its first live replica; the primary when none is left)."""
        return [
            acts[up.index(True)] if any(up) else acts[0]
            for acts, up in zip(self.actors, self.up, strict=True)
        ]

    def rank(self, expert: int, replica: int) -> int:
        return 1 + expert * self.config.replicas + replica

    def start(self, init_dir: str | Path | None) -> None:
        """(Re)create every actor from ``init_dir`` (a checkpoint) or the seed, and join a new group."""
        self._stop()
        init = str(init_dir) if init_dir else None
        path = str(self.topology.path)
        self.trunk = self.reservation.pin(TrunkWorker, 0).remote(
            self.config, path, self.plan, self.data_dir, init
        )
        self.actors = [
            [
                self.reservation.pin(ExpertWorker, self.rank(e, r)).remote(self.config, path, node, e, init)
                for r, node in enumerate(self.plan.replica_nodes(e))
            ]
            for e in range(self.config.experts)
        ]
        self.up = [[True] * len(acts) for acts in self.actors]
        prefix = self.groups.generation()
        world = 1 + self.config.experts * self.config.replicas
        joins = [self.trunk.join.remote(prefix, world)]
        for e, acts in enumerate(self.actors):
            joins += [a.join.remote(prefix, world, self.rank(e, r)) for r, a in enumerate(acts)]
        ray.get(joins, timeout=WAIT_S)
        self._routes()

    def _routes(self) -> None:
        """Tell the trunk which replica serves each expert, and each serving replica its live standbys."""
        serving: list[int | None] = []
        standbys: list[list[int]] = []
        calls = []
        for e, (acts, up) in enumerate(zip(self.actors, self.up, strict=True)):
            live = [r for r, ok in enumerate(up) if ok]
            serving.append(self.rank(e, live[0]) if live else None)
            standbys.append([self.rank(e, r) for r in live[1:]])
            if live:
                calls.append(acts[live[0]].set_standbys.remote(standbys[-1]))
        ray.get([self.trunk.set_routes.remote(serving, standbys), *calls], timeout=WAIT_S)

    def _live_actors(self) -> list[Any]:
        return [
            a
            for acts, up in zip(self.actors, self.up, strict=True)
            for a, ok in zip(acts, up, strict=True)
            if ok
        ]

    def close(self) -> None:
        """Stop every actor and remove the run's rendezvous keys from the cluster."""
        self._stop()
        self.groups.close()
        self.reservation.close()

    def _stop(self) -> None:
        for a in [self.trunk, *(a for acts in self.actors for a in acts)]:
            if a is not None:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)
        self.trunk, self.actors, self.up = None, [], []

    def check_experts(self) -> list[tuple[int, int]]:
        """Find dead expert actors (expert, replica): a standby takes over a dead serving replica; an expert
        with no live replica is masked out (its tokens go to the surviving experts). Returns the dead."""
        live = [(e, r) for e, up in enumerate(self.up) for r, ok in enumerate(up) if ok]
        dead = [
            live[i] for i in dead_actors([self.actors[e][r] for e, r in live], self.config.timeout_s + 15)
        ]
        for e, r in dead:
            self.up[e][r] = False
            with contextlib.suppress(Exception):  # unresponsive: make sure it is gone
                ray.kill(self.actors[e][r], no_restart=True)
        if dead:
            self._routes()
            gone = [e for e, _ in dead if not self.alive[e]]
            self.progress(
                f"  expert actors {dead} are gone"
                + (
                    f"; experts {gone} have no replica left: their tokens go to the surviving experts"
                    if gone
                    else "; standbys serve"
                )
            )
        return dead

    def _session(self, call: Any, what: str) -> dict[str, Any]:
        """Run one trunk call while every live expert serves it; bounded; experts' rows go to the ledger.
        An exception a live actor raised fails at once (:class:`WorkerFailed`)."""
        serving = [a.serve.remote() for a in self._live_actors()]
        try:
            result = ray.get(call, timeout=WAIT_S)
            done = ray.get(serving, timeout=WAIT_S)
        except ray.exceptions.RayError as exc:
            if failure_kind(exc) == "bug":
                raise WorkerFailed.from_ray(exc, f"MoE {what}") from exc
            raise
        for d in done:
            self.ledger.extend(d["rows"])
        self.ledger.extend(result.pop("rows"))
        if "clock_s" in result:  # the session ends when its last participant does
            result["clock_s"] = max([result["clock_s"], *(d["clock_s"] for d in done)])
        if "busy" in result:  # modelled work per node in this session (trunk and experts)
            for d in done:
                for node, seconds in d["busy"].items():
                    result["busy"][node] = result["busy"].get(node, 0.0) + seconds
        return result

    def run(self, make_call: Callable[[], Any], retries: int = 2) -> dict[str, Any]:
        """A session that survives dead experts: on failure, mark them dead and run it again without them."""
        for attempt in range(retries + 1):
            self.check_experts()
            try:
                return self._session(make_call(), "session")
            except (ray.exceptions.RayError, FabricError) as exc:
                dead = self.check_experts()
                if attempt == retries or not dead:
                    raise MoEError(f"MoE session failed (dead experts: {dead}): {exc}") from exc
        raise AssertionError("unreachable")

    def train_step(self, step: int, apply: bool = True, clock: float | None = None) -> dict[str, Any]:
        """One training step with every expert: a dead one is not routed around (its weights would stop
        learning) but reported, so the trainer restarts from the last checkpoint. ``clock``: the modelled
        instant it starts; the result's ``clock_s``: when its last participant is done."""
        gone = self.check_experts()
        if gone:
            raise ExpertsLost(f"expert actors (expert, replica) {gone} are gone")
        try:
            return self._session(self.trunk.train_step.remote(step, apply, clock), f"training step {step}")
        except (ray.exceptions.RayError, FabricError) as exc:
            gone = self.check_experts()
            if not gone:
                raise MoEError(
                    f"training step {step} failed and no expert actor was found dead: {exc}"
                ) from exc
            raise ExpertsLost(
                f"training step {step}: expert actors (expert, replica) {gone} died: {exc}"
            ) from exc

    def evaluate(self, windows: int = 64) -> dict[str, Any]:
        return self.run(lambda: self.trunk.evaluate.remote(windows))

    def generate(self, input_ids: list[int], max_new_tokens: int) -> dict[str, Any]:
        return self.run(lambda: self.trunk.generate.remote(input_ids, max_new_tokens))

    def checkpoint(self, path: Path, step: int, metrics: list[dict[str, Any]] | None = None) -> None:
        """A Mixtral checkpoint (transformers loads it as is) plus every actor's optimizer state, the
        trainer's ``metrics`` rows and the ledger so far (what a resumed run continues), atomically."""
        trunk = ray.get(self.trunk.state.remote(), timeout=WAIT_S)
        parts = ray.get([x.weights.remote() for x in self.experts], timeout=WAIT_S)
        model = build_moe_model(self.config)
        state = model.state_dict()
        for k, v in trunk["model"].items():
            state[k] = v
        for i in range(len(model.model.layers)):
            state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                [p["gate_up"][i] for p in parts]
            )
            state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([p["down"][i] for p in parts])
        model.load_state_dict(state)

        def extra(tmp: Path) -> None:
            torch.save(trunk["optimizer"], tmp / "optimizer-trunk.pt")
            for e, p in enumerate(parts):
                torch.save(p["optimizer"], tmp / f"optimizer-expert{e}.pt")
            self.ledger.save(tmp / "ledger.parquet")
            write_atomic(
                tmp / "trainer_state.json",
                json.dumps({"step": step, "plan": asdict(self.plan), "metrics": metrics or []}),
            )

        save_pretrained(model, train_tokenizer(PRESETS[self.config.preset].vocab_size), path, extra)

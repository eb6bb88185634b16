"""Streaming DiLoCo at fleet scale: fragments of the model synchronised on a staggered schedule, the outer
all-reduce overlapped with the inner steps, with the runtime's own rules
(edgeray.train.strategies.streaming_diloco.StreamingDiLoCo.run):

- every node runs every inner step (compute_s x its slowdown x a transient factor, drawn per step);
- fragment f is synchronised at the inner steps s with s % h == (h - f h / F) % h
  (:func:`fragment_offsets`, the strategy's ``offsets``): its all-reduce begins once every node has
  reached that step (the latest clock) and takes one hierarchical all-reduce of the fragment (the
  leaders' ring encoded by ``codec``; :func:`edgeray.sim.engine.plan_round`, from clocks all equal);
- with ``overlap`` = 0 the fragment merges at once: every clock waits for the all-reduce's end; with
  ``overlap`` = k > 0 the nodes keep training and the merge is due k inner steps later, when every clock
  waits for the end only if it is later (communication hidden behind k steps of compute).

A fragment here is 1/F of the parameters (the runtime cuts at tensor boundaries, about equal). A row is
one round of ``h`` inner steps (F syncs): its compute span, the summed phases of its syncs' all-reduces
(they overlap compute, so they need not add up to the round), ``exposed_s`` (how far the merges pushed the
latest clock: communication not hidden), bytes by link class and the largest single sync's inter-region
bytes. Churn: each node is up or down per inner step (the round engine's two-state chain, with the first
step's time as the nominal one); a node that is down neither computes nor takes part in a sync; one
coming back joins at the step's start; each sync's all-reduce is planned over the nodes up then. Loss is
not simulated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeray.sim.engine import (
    FleetArrays,
    RoundConfig,
    SimError,
    SimResult,
    churn_probabilities,
    plan_round,
    run_round,
    sample_compute,
    sample_costs,
)
from edgeray.topology import Topology


def fragment_offsets(h: int, fragments: int) -> list[int]:
    """Inner step (mod h) at which each fragment is synchronised (the strategy's ``offsets``)."""
    return [(h - f * h // fragments) % h for f in range(fragments)]


@dataclass(frozen=True)
class StreamingConfig:
    params: int = 1_000_000
    """Model size in float32 values; each fragment is about params / fragments of them."""
    compute_s: float = 0.5
    rounds: int = 10
    """Rounds of ``h`` inner steps."""
    h: int = 30
    fragments: int = 4
    overlap: int = 1
    codec: str = "int4"
    jitter: bool = True
    churn: bool = True
    """Nodes fail and come back from their MTBF and availability: the round engine's chain, drawn per inner
    step (its nominal time: the first step's)."""
    transient: float = 0.0
    transient_factor: float = 5.0
    overhead_s: float = 0.0
    goodput: float = 1.0
    seed: int = 0

    def round_config(self, params: int) -> RoundConfig:
        """The engine's config for one fragment's all-reduce (no compute, no churn)."""
        return RoundConfig(
            params=params, compute_s=0.0, rounds=1, codec=self.codec, jitter=self.jitter, churn=False,
            overhead_s=self.overhead_s, goodput=self.goodput, seed=self.seed,
        )  # fmt: skip

    def check(self) -> StreamingConfig:
        out = []
        if self.h < 1:
            out.append(f"h = {self.h}: must be >= 1")
        elif not 1 <= self.fragments <= self.h:
            out.append(f"fragments = {self.fragments}: must be in [1, h = {self.h}]")
        elif not 0 <= self.overlap < self.h:
            out.append(f"overlap = {self.overlap}: must be in [0, h = {self.h})")
        if self.params < self.fragments:
            out.append(f"params = {self.params}: must be >= fragments = {self.fragments}")
        # what a round of the engine checks: rounds, compute, transient stragglers, codec, calibration
        out += RoundConfig(
            params=self.params, compute_s=self.compute_s, rounds=self.rounds, codec=self.codec,
            transient=self.transient, transient_factor=self.transient_factor, overhead_s=self.overhead_s,
            goodput=self.goodput,
        ).problems()  # fmt: skip
        if out:
            raise SimError("streaming config: " + "; ".join(out))
        return self


class StreamingResult(SimResult):
    fragments: int = 1

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        rows = self.rows
        out.update(
            fragments=self.fragments,
            outer_syncs=int(sum(r["syncs"] for r in rows)),
            peak_outer_inter_region_bytes=max((r["peak_inter_region_bytes"] for r in rows), default=0),
            exposed_s=float(sum(r["exposed_s"] for r in rows)),
        )
        return out


def simulate_streaming(topology: Topology, config: StreamingConfig) -> StreamingResult:
    """Run ``config.rounds`` x ``h`` inner steps of Streaming DiLoCo on ``topology``; see the module
    docstring."""
    config.check()
    fleet = FleetArrays(topology)
    rng = np.random.default_rng(config.seed)
    up = np.ones(fleet.n, dtype=bool)
    live = np.arange(fleet.n)
    sizes = np.full(config.fragments, config.params // config.fragments)
    sizes[: config.params % config.fragments] += 1
    plans = [plan_round(fleet, live, int(s), config.codec) for s in sizes]
    probs: tuple[np.ndarray, np.ndarray] | None = None
    offsets = fragment_offsets(config.h, config.fragments)
    # the engine's round config per fragment: compute 0, so sample_compute adds nothing to its clocks
    fragment_configs = [config.round_config(int(s)) for s in sizes]
    step_config = RoundConfig(
        params=1, compute_s=config.compute_s, transient=config.transient,
        transient_factor=config.transient_factor,
    )  # fmt: skip
    result = StreamingResult(
        RoundConfig(params=config.params, compute_s=config.compute_s, rounds=config.rounds,
                    local_steps=config.h, codec=config.codec, seed=config.seed),
        topology.name, fleet.n, len(fleet.region_names),
    )  # fmt: skip
    result.fragments = config.fragments
    clock = np.zeros(fleet.n)
    in_flight: dict[int, tuple[int, float]] = {}  # fragment -> (step its merge is due, end)
    step = 0
    for r in range(config.rounds):
        start = float(clock[up].max())
        live_min = len(live)
        before = clock.copy()
        busy = np.zeros(fleet.n)
        phases = np.zeros(3)
        intra = inter = syncs = peak = retransmitted = 0
        exposed = 0.0
        for _ in range(config.h):
            if probs is not None:
                at = float(clock[up].max())
                fail, repair = probs
                draw = rng.random(fleet.n)
                back = ~up & (draw < repair)
                up = np.where(up, draw >= fail, back)
                clock[back] = at  # a node coming back joins at the step's start
                if not up.any():
                    raise SimError(
                        f"step {step + 1}: every node is down (availability too low for this fleet)"
                    )
                live = np.flatnonzero(up)
                live_min = min(live_min, len(live))
            compute = sample_compute(fleet, live, step_config, rng)
            clock += compute
            busy += compute
            step += 1
            if config.churn and probs is None:
                probs = churn_probabilities(fleet, float(compute.max()))
            for f, (due, end) in sorted(in_flight.items()):
                if due <= step:
                    latest = float(clock[live].max())
                    exposed += max(0.0, end - latest)
                    clock[live] = np.maximum(clock[live], end)
                    del in_flight[f]
            for f, offset in enumerate(offsets):
                if step % config.h != offset:
                    continue
                begin = float(clock[live].max())
                if not np.array_equal(plans[f].live, live):
                    plans[f] = plan_round(fleet, live, int(sizes[f]), config.codec)
                plan = plans[f]
                costs = sample_costs(fleet, plan, fragment_configs[f], rng)
                comm_clock = np.zeros(fleet.n)
                marks = run_round(comm_clock, plan, costs)
                comm = marks[-1]
                phases += np.diff(np.r_[0.0, marks[1:]])
                f_inter = int(sum(float(m.nbytes.sum()) for m in plan.ring))
                intra += int(plan.reduce.nbytes.sum() + plan.broadcast.nbytes.sum())
                inter += f_inter
                peak = max(peak, f_inter)
                syncs += 1
                retransmitted += costs.retransmitted
                if config.overlap == 0:  # merged at once: every clock waits for the all-reduce
                    exposed += comm
                    clock[live] = np.maximum(clock[live], begin + comm)
                else:
                    in_flight[f] = (step + config.overlap, begin + comm)
        end = float(clock[up].max())
        span = np.where(up, clock - before, 0.0)
        idle = np.maximum(span - busy, 0.0)
        idle_tier = np.bincount(fleet.tier, weights=idle, minlength=len(fleet.tier_names))
        span_tier = np.bincount(fleet.tier, weights=span, minlength=len(fleet.tier_names))
        result.rows.append(
            {
                "round": r,
                "end_s": end,
                "round_s": end - start,
                "compute_s": float(busy.max()),
                "reduce_s": float(phases[0]),
                "ring_s": float(phases[1]),
                "broadcast_s": float(phases[2]),
                "exposed_s": exposed,
                "syncs": syncs,
                "live": live_min,
                "leaders": len(plans[0].leaders),
                "intra_region_bytes": intra,
                "inter_region_bytes": inter,
                "peak_inter_region_bytes": peak,
                "retransmitted_bytes": retransmitted,
                "energy_j": float(np.sum(fleet.busy_w * busy + fleet.idle_w * idle)),
                **{f"idle_s_{t}": float(v) for t, v in zip(fleet.tier_names, idle_tier, strict=True)},
                **{f"live_s_{t}": float(v) for t, v in zip(fleet.tier_names, span_tier, strict=True)},
            }
        )
    # the run ends with every fragment merged
    for _, end_f in in_flight.values():
        np.maximum(clock, end_f, out=clock)
    if in_flight and result.rows:
        last = result.rows[-1]
        final = float(clock[up].max())
        last["exposed_s"] += max(0.0, final - last["end_s"])
        last["round_s"] += final - last["end_s"]
        last["end_s"] = final
    return result

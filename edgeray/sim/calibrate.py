"""The simulator against the emulated cluster: the same all-reduce, phase by phase, and a fit of its two
free parameters (:attr:`RoundConfig.overhead_s`, :attr:`RoundConfig.goodput`).

    rows = emulate(topo, sizes=[10_000, 100_000, 4_000_000], reps=25)   # on the connected cluster (Ray)
    fit = fit_calibration(topo, rows, train=[10_000, 4_000_000], seeds=range(20))
    report = compare(topo, rows, fit, seeds=range(200))   # per strategy, size and phase; 100k held out

Emulated: one :class:`~edgeray.fabric.worker.FabricWorker` per topology node runs the strategy's all-reduce
through the fabric (``hierarchical``: sync-hier's and DiLoCo's reduce, leaders' ring, broadcast; ``sync``:
the flat ring over every node) from a modelled clock of 0, and reports its clock after each phase. A phase
ends when the latest clock passes it, as :func:`edgeray.sim.engine.run_round` marks it. Simulated: one round
with no compute and no churn, on the same topology, once per seed; both draw jitter and loss from the links.
Each (strategy, size, phase) is compared by its median over repetitions / seeds. Where WAN loss makes a
phase bimodal (a retransmission adds two latencies or not: here 100k-1M values), medians need tens of
repetitions; 40 of them matched the simulator's distribution within 2-7% at every quartile.

The fit minimises the squared log ratio simulated / emulated over the training sizes' phases (a grid, then
two finer grids around the best point): it is deterministic, since the simulator's draws for a seed do not
depend on the two parameters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeray.sim.engine import RoundConfig, SimError, simulate
from edgeray.topology import Topology

PHASES = ("reduce_s", "ring_s", "broadcast_s")
STRATEGIES = {"hierarchical": ("hierarchical", "hierarchical"), "sync": ("flat", "ring")}
"""Strategy -> (FabricWorker op, RoundConfig.allreduce)."""
TOLERANCE = 0.10
"""The calibration target: per-phase medians within 10% of the emulated ones on held-out sizes."""


@dataclass(frozen=True)
class Calibration:
    overhead_s: float = 0.0
    goodput: float = 1.0
    train_sizes: tuple[int, ...] = ()
    loss: float = 0.0
    """Mean squared log ratio over the training phases at the optimum."""

    def config(self, **kwargs: Any) -> RoundConfig:
        """A RoundConfig with these parameters (and ``kwargs``)."""
        return RoundConfig(overhead_s=self.overhead_s, goodput=self.goodput, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_calibration(path: str | Path) -> Calibration:
    """A calibration.json written by jobs/calibrate_sim.py (SimError naming the file and field if not)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SimError(f"calibration {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SimError(f"calibration {path}: expected an object with overhead_s and goodput")
    values = {}
    for name in ("overhead_s", "goodput"):
        value = data.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise SimError(f"calibration {path}: {name} = {value!r}: expected a number")
        values[name] = float(value)
    config = RoundConfig(overhead_s=values["overhead_s"], goodput=values["goodput"])
    problems = [p for p in config.problems() if p.startswith(("overhead_s", "goodput"))]
    if problems:
        raise SimError(f"calibration {path}: " + "; ".join(problems))
    return Calibration(
        config.overhead_s, config.goodput, tuple(data.get("train_sizes", ())), float(data.get("loss", 0.0))
    )


def emulate(
    topology: Topology,
    sizes: Iterable[int],
    reps: int,
    *,
    strategies: Iterable[str] = tuple(STRATEGIES),
    name: str = "calibrate",
    timeout_s: float = 300.0,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Start one fabric worker per topology node on the connected Ray cluster and :func:`emulate_on` them;
    the actors are stopped and the groups' keys removed however it ends."""
    import ray

    from edgeray.fabric.collectives import GroupPlan
    from edgeray.fabric.groups import RunGroups
    from edgeray.fabric.worker import FabricWorker
    from edgeray.placement import pin

    started: list[Any] = []
    with RunGroups(name) as groups:
        try:
            plan = GroupPlan.from_nodes(topology, list(topology.nodes), prefix=groups.prefix)
            started += [pin(FabricWorker, node=n).remote(str(topology.path), n) for n in plan.nodes]
            ray.get([w.join.remote(plan) for w in started], timeout=180)
            return emulate_on(
                started, sizes, reps, strategies=strategies, timeout_s=timeout_s, progress=progress
            )
        finally:
            for w in started:
                ray.kill(w, no_restart=True)


def emulate_on(
    workers: list[Any],
    sizes: Iterable[int],
    reps: int,
    *,
    strategies: Iterable[str] = tuple(STRATEGIES),
    timeout_s: float = 300.0,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run each strategy's all-reduce ``reps`` times per size on ``workers`` (FabricWorkers that joined one
    plan of every topology node); one row per run with each phase's modelled seconds."""
    import ray

    strategies = list(strategies)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SimError(f"calibration strategies {unknown}: valid are {list(STRATEGIES)}")
    rows: list[dict[str, Any]] = []
    for strategy in strategies:
        op = STRATEGIES[strategy][0]
        for size in sizes:
            for rep in range(reps):
                marks = np.array(
                    ray.get([w.phase_clocks.remote(op, size, rep) for w in workers], timeout=timeout_s)
                ).max(axis=0)
                ends = np.r_[0.0, marks]
                rows.append(
                    {"strategy": strategy, "values": int(size), "rep": rep,
                     **{p: float(ends[i + 1] - ends[i]) for i, p in enumerate(PHASES)},
                     "round_s": float(marks[-1])}
                )  # fmt: skip
            mine = [r["round_s"] for r in rows if (r["strategy"], r["values"]) == (strategy, size)]
            progress(f"  emulated {strategy:12} {size:>10,} values: median round {np.median(mine):.4f} s")
    return rows


def simulated(
    topology: Topology, strategy: str, size: int, seeds: Iterable[int], calibration: Calibration
) -> dict[str, float]:
    """Median modelled seconds per phase (and round) of one simulated round per seed."""
    allreduce = STRATEGIES[strategy][1]
    rows = [
        simulate(
            topology,
            calibration.config(
                params=size, rounds=1, compute_s=0.0, churn=False, seed=s, allreduce=allreduce
            ),
        ).rows[0]
        for s in seeds
    ]
    return {p: float(np.median([r[p] for r in rows])) for p in (*PHASES, "round_s")}


def medians(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Emulated median per (strategy, size) and phase."""
    keys = sorted({(r["strategy"], r["values"]) for r in rows})
    return {
        k: {
            p: float(np.median([r[p] for r in rows if (r["strategy"], r["values"]) == k]))
            for p in (*PHASES, "round_s")
        }
        for k in keys
    }


def _terms(emulated: dict[str, float]) -> list[str]:
    """The phases a strategy has (a flat ring has no reduce or broadcast)."""
    return [p for p in PHASES if emulated[p] > 0]


def fit_calibration(
    topology: Topology, rows: list[dict[str, Any]], *, train: Iterable[int], seeds: Iterable[int]
) -> Calibration:
    """The (overhead_s, goodput) that bring the simulated phase medians closest to the emulated ones on
    the ``train`` sizes (every strategy in ``rows``)."""
    train = sorted(set(train))
    seeds = list(seeds)
    emu = {k: v for k, v in medians(rows).items() if k[1] in train}
    if not emu:
        raise SimError(f"calibration: no emulated rows for the training sizes {train}")

    def loss(overhead: float, goodput: float) -> float:
        c = Calibration(overhead, goodput)
        errs = []
        for (strategy, size), e in emu.items():
            s = simulated(topology, strategy, size, seeds, c)
            errs += [math.log(s[p] / e[p]) ** 2 for p in _terms(e) if s[p] > 0]
        return float(np.mean(errs)) if errs else math.inf

    overheads = np.linspace(0.0, 0.004, 9)
    goodputs = np.geomspace(0.5, 2.0, 9)
    best = min((loss(o, g), o, g) for o in overheads for g in goodputs)
    o_step, g_ratio = overheads[1] - overheads[0], goodputs[1] / goodputs[0]
    for _ in range(2):  # two finer grids around the best point
        o_step, g_ratio = o_step / 4, g_ratio**0.25
        _, o0, g0 = best
        grid = [(max(0.0, o0 + i * o_step), g0 * g_ratio**j) for i in range(-4, 5) for j in range(-4, 5)]
        best = min([best, *((loss(o, g), o, g) for o, g in grid)])
    value, overhead, goodput = best
    return Calibration(float(overhead), float(goodput), tuple(train), value)


def compare(
    topology: Topology,
    rows: list[dict[str, Any]],
    calibration: Calibration,
    *,
    seeds: Iterable[int],
) -> list[dict[str, Any]]:
    """One row per (strategy, size, phase): emulated and simulated medians (uncalibrated and calibrated),
    the calibrated relative error, whether the size was a training size, and whether it is within
    :data:`TOLERANCE`."""
    seeds = list(seeds)
    out = []
    raw = Calibration()
    for (strategy, size), e in medians(rows).items():
        s0 = simulated(topology, strategy, size, seeds, raw)
        s1 = simulated(topology, strategy, size, seeds, calibration)
        for p in [*_terms(e), "round_s"]:
            error = s1[p] / e[p] - 1
            out.append(
                {"strategy": strategy, "values": size, "phase": p.removesuffix("_s"),
                 "held_out": size not in calibration.train_sizes, "emulated_s": e[p],
                 "simulated_raw_s": s0[p], "simulated_s": s1[p], "error": error,
                 "raw_error": s0[p] / e[p] - 1, "within": abs(error) <= TOLERANCE}
            )  # fmt: skip
    return out

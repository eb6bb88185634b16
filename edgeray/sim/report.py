"""A simulation's run directory: rounds.parquet, summary.json and a plot, written atomically.

edgeray sim nodes=10000,regions=50 --rounds 100 --out runs/sim      # (edgeray.cli)
write_run(simulate(topo, config), Path("runs/sim"))
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from edgeray.atomic import write_atomic
from edgeray.sim.engine import SimResult
from edgeray.topology import Topology

LOSS_NOTE = "loss of the model is not simulated: time, bytes and energy only"


def resolve_fleet(arg: str) -> Topology:
    """A topology file or preset name, or a generator spec (``nodes=10000,regions=50,...``: any ``=``)."""
    if "=" in arg:
        from edgeray.sim.fleet import FleetSpec, generate

        return generate(FleetSpec.parse(arg))
    from edgeray.topology import load_topology, resolve_topology_path

    return load_topology(resolve_topology_path(arg))


def write_run(result: SimResult, out: Path) -> dict[str, Any]:
    """Write ``out``/rounds.parquet (one row per round), summary.json and rounds.png; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rounds.parquet.{os.getpid()}.tmp"
    pq.write_table(pa.Table.from_pylist(result.rows), tmp)
    os.replace(tmp, out / "rounds.parquet")
    summary = {**result.summary(), "config": asdict(result.config), "note": LOSS_NOTE}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    plot(result, out / "rounds.png")
    return summary


def plot(result: SimResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["round"] for r in rows]
    bottom = [0.0] * len(rows)
    for phase in ("compute_s", "reduce_s", "ring_s", "broadcast_s"):
        vals = [r[phase] for r in rows]
        a.bar(x, vals, bottom=bottom, width=1.0, label=phase.removesuffix("_s"))
        bottom = [p + v for p, v in zip(bottom, vals, strict=True)]
    a.set_xlabel("round")
    a.set_ylabel("modelled seconds")
    a.set_title(f"{result.topology}: {result.nodes} nodes, {result.regions} regions")
    a.legend(fontsize=8)
    b.plot(x, [r["live"] for r in rows], color="#2a9d8f")
    b.set_xlabel("round")
    b.set_ylabel("live nodes")
    b.set_title("churn (" + LOSS_NOTE.split(":")[0] + ")", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)

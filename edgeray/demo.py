"""The main job: place one actor in every region of the topology and show where each landed.

    ray job submit -- python -m edgeray.demo --topology clusters/local.yaml
    python jobs/place_regions.py --topology clusters/local.yaml      # the same, as a jobs/ entrypoint

Connects with ``ray.init()`` (RAY_ADDRESS etc. from ``eval "$(edgeray env)"`` or the job's environment),
pins one zero-CPU actor per region through :mod:`edgeray.placement`, and prints a table of region, tier
and node per actor. Exits 1 if any actor landed outside its region. With ``--train-steps N`` it then trains
the tiny Llama pipeline-parallel across the fleet (edgeray.train) and prints the plan, the loss and the bytes
per link class; ``edgeray demo`` / ``make demo`` run it that way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import ray

from edgeray.atomic import write_atomic
from edgeray.placement import pin, wait_ready, where
from edgeray.topology import (
    NODE_LABEL,
    REGION_LABEL,
    TIER_LABEL,
    Topology,
    load_topology,
    resolve_topology_path,
)


@ray.remote(num_cpus=0)
class RegionProbe:
    """A tiny actor that reports the labels of the node it was placed on."""

    def __init__(self, region: str) -> None:
        self.region = region

    def report(self) -> dict[str, Any]:
        return {"wanted": self.region, "pid": os.getpid(), **where()}


def place_one_actor_per_region(topology: Topology, *, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Start a :class:`RegionProbe` pinned to each region; returns one report per region (wanted vs landed)."""
    actors = [pin(RegionProbe, region=r).remote(r) for r in topology.regions]
    try:
        wait_ready(actors, timeout_s=timeout_s)
        reports = ray.get([a.report.remote() for a in actors], timeout=timeout_s)
    finally:
        for a in actors:
            ray.kill(a)
    for rep in reports:
        rep["region"] = rep.pop(REGION_LABEL, None)
        rep["tier"] = rep.pop(TIER_LABEL, None)
        rep["node"] = rep.pop(NODE_LABEL, None)
        rep["ok"] = rep["region"] == rep["wanted"] and rep["node"] in {
            n.name for n in topology.regions[rep["wanted"]].nodes
        }
    return reports


def print_table(reports: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="one actor per region")
    for col in ("wanted region", "landed region", "tier", "node", "pid", "ok"):
        table.add_column(col)
    for r in reports:
        table.add_row(
            r["wanted"],
            str(r["region"]),
            str(r["tier"]),
            str(r["node"]),
            str(r["pid"]),
            "yes" if r["ok"] else "NO",
        )
    Console(width=100).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--topology",
        default=os.environ.get("EDGERAY_TOPOLOGY") or "local",
        help="topology file or preset name (default: $EDGERAY_TOPOLOGY, else the local preset)",
    )
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument(
        "--json", help="also write what happened to this file: placement, training summary, served answers"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="then train the tiny Llama pipeline-parallel for this many steps (0: placement only)",
    )
    parser.add_argument("--out", default="runs/demo", help="run directory for the training part")
    parser.add_argument(
        "--serve-port",
        type=int,
        default=0,
        help="then serve the trained checkpoint regionally on this HTTP port and ask from every region (0: no)",
    )
    parser.add_argument("--engine", default="auto", help="serving engine: auto | vllm | torch")
    parser.add_argument(
        "--traffic-s",
        type=float,
        default=0.0,
        help="after the answers, keep asking from every region in turn for this long, then send one request "
        "the router must refuse (what a dashboard then shows); 0: no",
    )
    parser.add_argument(
        "--linger-s",
        type=float,
        default=0.0,
        help="keep the app up this long after the last request (a scraper's last look at its metrics)",
    )
    args = parser.parse_args(argv)
    topology = load_topology(resolve_topology_path(args.topology))
    t0 = time.monotonic()
    ray.init(logging_level=logging.ERROR, log_to_driver=False)
    try:
        reports = place_one_actor_per_region(topology, timeout_s=args.timeout_s)
        print_table(reports)
        print(f"placed {len(reports)} actors in {time.monotonic() - t0:.1f} s", flush=True)
        result: dict[str, Any] = {"placement": reports}
        if args.json:
            write_atomic(args.json, json.dumps(result, indent=2))
        if args.train_steps > 0 and all(r["ok"] for r in reports):
            result["training"] = train_demo(topology, steps=args.train_steps, out=args.out)
            if args.json:
                write_atomic(args.json, json.dumps(result, indent=2))
            if args.serve_port:
                result["serving"] = serve_demo(
                    topology,
                    result["training"]["checkpoint"],
                    port=args.serve_port,
                    engine=args.engine,
                    traffic_s=args.traffic_s,
                    linger_s=args.linger_s,
                )
                if args.json:
                    write_atomic(args.json, json.dumps(result, indent=2))
    finally:
        ray.shutdown()
    return 0 if all(r["ok"] for r in reports) else 1


def train_demo(topology: Topology, *, steps: int, out: str) -> dict[str, Any]:
    """Train the tiny Llama across three stages of the fleet; print the plan, the loss and bytes per link."""
    import pyarrow.parquet as pq

    from edgeray.train.pipeline import PipelineConfig
    from edgeray.train.planner import plan_pipeline
    from edgeray.train.run import train

    stages = min(3, len(topology.nodes))
    plan = plan_pipeline(topology, stages=stages, micro_batch_size=4, seq_len=64, microbatches=4)
    print(f"\npipeline plan ({stages} stages, 1F1B, 4 micro-batches):\n{plan.table()}", flush=True)
    config = PipelineConfig(boundaries=plan.boundaries, schedule="1f1b", microbatches=4, micro_batch_size=4)
    every = max(1, steps // 10)
    summary = train(
        topology,
        plan,
        config,
        out=out,
        steps=steps,
        seq_len=64,
        progress=lambda m: (
            print(m, flush=True)
            if m.startswith("step ") and (int(m.split()[1].split("/")[0]) % every == 0)
            else None
        ),
    )
    ledger = pq.read_table(f"{out}/ledger.parquet").to_pylist()
    by_class: dict[str, int] = {}
    for row in ledger:
        by_class[row["link_class"]] = by_class.get(row["link_class"], 0) + row["bytes"]
    print(
        f"loss {summary['initial_loss']:.3f} -> {summary['final_loss']:.3f} (validation {summary['val_loss']:.3f}) "
        f"in {steps} steps, {summary['tokens_per_s']:.0f} tokens/s"
    )
    print(
        "bytes over the fabric: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(by_class.items()))
    )
    print(f"checkpoint (Hugging Face directory): {summary['checkpoint']}")
    return {**summary, "bytes_by_class": by_class}


def serve_demo(
    topology: Topology,
    checkpoint: str,
    *,
    port: int,
    engine: str,
    timeout_s: float = 300.0,
    traffic_s: float = 0.0,
    linger_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Serve ``checkpoint`` with the regional app, stream one completion asked from each region over HTTP
    (OpenAI API), print where each was served and its latency breakdown, then shut the app down. Returns
    one record per region asked: status, text and the router's breakdown (served region, node, engine,
    milliseconds)."""
    import secrets

    from ray import serve

    from edgeray.serve.app import app
    from edgeray.serve.client import router_address, stream_completion, wait_until_serving

    key = secrets.token_urlsafe(16)  # a key for this demo only: the app requires one
    os.environ["EDGERAY_API_KEYS"] = key
    print(f"\nserving {checkpoint} in every region (engine {engine}) on port {port} ...", flush=True)
    t0 = time.monotonic()
    serve.start(proxy_location="Disabled")  # the app's router listens itself: no Ray hop on the stream
    serve.run(
        app({"topology": str(topology.path), "model": checkpoint, "engine": engine, "port": port}),
        name="regional",
        route_prefix="/",
        blocking=False,
    )
    answers: list[dict[str, Any]] = []
    try:
        base = router_address(port)
        wait_until_serving(base, key, list(topology.regions), timeout_s=timeout_s)
        print(
            f"router at {base}; every region serving after {time.monotonic() - t0:.0f} s (engine start included)"
        )
        print(
            f"{'asked from':12} {'served in':10} {'node':15} {'engine':6} {'net in':>7} {'net out':>7} "
            f"{'ttft':>7} {'decode':>7} {'e2e ms':>7}  text",
            flush=True,
        )
        for region in topology.regions:
            # 1 s first-token budget: a shared 2-core machine runs every "region" here
            status, text, b = stream_completion(base, key, "The for statement", region=region, budget_ms=1000)
            answers.append({"asked_from": region, "status": status, "text": text, **(b or {})})
            if status != 200:
                print(f"{region:12} HTTP {status}: {text}", flush=True)
                continue
            print(
                f"{region:12} {b['region']:10} {b['node']:15} {b['engine']:6} {b['network_in_ms']:7.1f} "
                f"{b['network_out_ms']:7.1f} {b['ttft_ms']:7.1f} {b['decode_ms']:7.1f} {b['e2e_ms']:7.1f}  "
                f"{text!r}",
                flush=True,
            )
        if traffic_s > 0:
            _traffic(base, key, list(topology.regions), traffic_s)
        if linger_s > 0:
            time.sleep(linger_s)
    finally:
        serve.shutdown()
    return answers


def _traffic(base: str, key: str, regions: list[str], seconds: float, most: int = 2000) -> None:
    """Ask from each region in turn for ``seconds`` (at most ``most`` requests), then send one request over
    the token limit: the router refuses it (400) and every region goes on serving."""
    from edgeray.serve.client import stream_completion

    t0, sent, failed = time.monotonic(), 0, 0
    while time.monotonic() - t0 < seconds and sent < most:
        status, _, _ = stream_completion(base, key, "The for statement", region=regions[sent % len(regions)])
        sent, failed = sent + 1, failed + (status != 200)
    status, message, _ = stream_completion(base, key, "too long", region=regions[0], max_tokens=10**6)
    after, _, _ = stream_completion(base, key, "The for statement", region=regions[0])
    print(
        f"traffic: {sent} requests from {len(regions)} regions in {time.monotonic() - t0:.0f} s, {failed} failed; "
        f"a request over the token limit got HTTP {status} ({message[:60]}...), the next one HTTP {after}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())

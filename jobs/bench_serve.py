"""Benchmark regional serving: the bare engine vs the full Serve path, in-region routing, overload.

    python jobs/bench_serve.py --out results/serve [--engine auto] [--requests 48] [--quick]
    eval "$(edgeray env)"; ray job submit --working-dir . -- python jobs/bench_serve.py --out /tmp/serve

In one run, on the local fleet (or the cluster of RAY_ADDRESS / the job): the same prompts through
(a) the bare engine in this process and (b) the regional Serve app over HTTP (streaming, OpenAI API, one
caller region), at concurrency 1, 8 and 32: p50 / p95 time to first token, p95 end-to-end latency and
output tokens/s. Then, under normal load (callers spread over every region, concurrency 4, default budget),
the fraction served in the caller's region; then an overload burst from one region far above its capacity:
how many requests were spilled to other regions, rejected early (429 / 503) or failed (anything else).
Writes DIR/summary.json (keys ``bare``, ``serve``, ``in_region_fraction``, ``overload``, ``targets``) and
prints a table. The bare engine runs first and is shut down before the app starts: they share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeray import cluster
from edgeray.atomic import write_atomic
from edgeray.topology import load_topology, resolve_topology_path

PROMPTS = [
    "The for statement",
    "A class definition",
    "Exceptions are raised",
    "The import system",
    "Built-in functions",
    "The with statement",
    "Comparisons",
    "Lambda expressions",
]
LEVELS = (1, 8, 32)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _stats(ttft: list[float], e2e: list[float], tokens: int, wall: float) -> dict[str, float]:
    return {
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p95_ms": _pct(ttft, 95),
        "e2e_p95_ms": _pct(e2e, 95),
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "requests": len(e2e),
    }


async def bare(model: str, engine_kind: str, n: int, max_tokens: int) -> dict[str, dict[str, float]]:
    from transformers import AutoTokenizer

    from edgeray.serve.engines import Request, make_engine

    tok = AutoTokenizer.from_pretrained(model)
    engine = make_engine(model, kind=engine_kind)
    await engine.start()
    out = {}
    try:
        await _warm_up(engine, tok)
        for c in LEVELS:
            ttft: list[float] = []
            e2e: list[float] = []
            tokens = 0
            sem = asyncio.Semaphore(c)

            async def one(
                i: int, sem: asyncio.Semaphore = sem, ttft: list[float] = ttft, e2e: list[float] = e2e
            ) -> None:
                nonlocal tokens
                async with sem:
                    t0 = time.perf_counter()
                    first = None
                    ids = tok(PROMPTS[i % len(PROMPTS)])["input_ids"]
                    async for d in engine.stream(Request(prompt_ids=ids, max_tokens=max_tokens)):
                        if first is None:
                            first = time.perf_counter()
                        tokens += len(d.token_ids)
                    ttft.append(((first or time.perf_counter()) - t0) * 1e3)
                    e2e.append((time.perf_counter() - t0) * 1e3)

            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            out[str(c)] = _stats(ttft, e2e, tokens, time.perf_counter() - t0)
            print(f"  bare   c={c:2d}  {_row(out[str(c)])}", flush=True)
    finally:
        await engine.shutdown()
    return out


async def _warm_up(engine: Any, tok: Any) -> None:
    from edgeray.serve.engines import Request

    async for _d in engine.stream(Request(prompt_ids=tok("warm up")["input_ids"], max_tokens=4)):
        pass


def _row(s: dict[str, float]) -> str:
    return (
        f"TTFT p50 {s['ttft_p50_ms']:7.1f} ms  p95 {s['ttft_p95_ms']:7.1f} ms  e2e p95 {s['e2e_p95_ms']:7.1f} ms  "
        f"{s['tokens_per_s']:7.0f} tok/s"
    )


async def http_stream(
    client: Any, url: str, key: str, region: str, prompt: str, max_tokens: int, budget_ms: float | None
) -> dict[str, Any]:
    """One streaming completion; returns status, ttft/e2e ms, tokens, served region."""
    headers = {"Authorization": f"Bearer {key}", "x-edgeray-region": region}
    if budget_ms is not None:
        headers["x-edgeray-budget-ms"] = str(budget_ms)
    body = {"model": "edgeray-tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    t0 = time.perf_counter()
    first = None
    tokens, served = 0, None
    skipped: list[str] = []
    try:
        async with client.stream("POST", url, headers=headers, json=body, timeout=120) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"status": 500}
                if chunk.get("choices") and first is None:
                    first = time.perf_counter()
                if "edgeray" in chunk:
                    tokens = chunk["usage"]["completion_tokens"]
                    served = chunk["edgeray"]["region"]
                    skipped = chunk["edgeray"]["skipped"]
    except Exception:
        return {"status": -1}
    end = time.perf_counter()
    return {
        "status": 200,
        "ttft_ms": ((first or end) - t0) * 1e3,
        "e2e_ms": (end - t0) * 1e3,
        "tokens": tokens,
        "region": served,
        "caller": region,
        "skipped": skipped,
    }


async def through_serve(
    base: str, key: str, regions: list[str], n: int, max_tokens: int, normal_concurrency: int
) -> dict[str, Any]:
    import httpx

    url = f"{base}/v1/completions"
    out: dict[str, Any] = {"serve": {}}
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits) as client:
        await http_stream(client, url, key, regions[0], "warm up", 4, 60_000)
        for c in LEVELS:  # one caller region, a generous budget: the Serve path's own cost
            sem = asyncio.Semaphore(c)

            async def one(i: int, sem: asyncio.Semaphore = sem) -> dict[str, Any]:
                async with sem:
                    return await http_stream(
                        client, url, key, regions[0], PROMPTS[i % len(PROMPTS)], max_tokens, 60_000
                    )

            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(i) for i in range(n)))
            wall = time.perf_counter() - t0
            ok = [r for r in res if r["status"] == 200]
            stats = _stats(
                [r["ttft_ms"] for r in ok], [r["e2e_ms"] for r in ok], sum(r["tokens"] for r in ok), wall
            )
            stats["failed"] = len(res) - len(ok)
            out["serve"][str(c)] = stats
            print(f"  serve  c={c:2d}  {_row(stats)}  failed {stats['failed']}", flush=True)
        # Normal load, callers in every region, the default budget; after the routers' latency window
        # (10 s), so the saturation runs above do not count as the present.
        await asyncio.sleep(12)
        sem = asyncio.Semaphore(normal_concurrency)

        async def spread(i: int) -> dict[str, Any]:
            async with sem:
                region = regions[i % len(regions)]
                return await http_stream(client, url, key, region, PROMPTS[i % len(PROMPTS)], 8, None)

        res = await asyncio.gather(*(spread(i) for i in range(max(n, 3 * len(regions)))))
        served = [r for r in res if r["status"] == 200]
        out["in_region_fraction"] = sum(r["region"] == r["caller"] for r in served) / max(len(res), 1)
        reasons = [r["skipped"][0] for r in served if r["region"] != r["caller"] and r["skipped"]]
        out["normal_load"] = {
            "requests": len(res),
            "served": len(served),
            "concurrency": normal_concurrency,
            "ttft_p50_ms": _pct([r["ttft_ms"] for r in served], 50),
            "spill_reasons": reasons[:10],
        }
        print(
            f"  in-region under normal load (concurrency {normal_concurrency}, default budget): "
            f"{out['in_region_fraction']:.3f} of {len(res)}; TTFT p50 {out['normal_load']['ttft_p50_ms']:.1f} ms; "
            f"why some spilled: {reasons[:3]}",
            flush=True,
        )
        # Overload: a burst from one region far above its capacity; short budget.
        burst = 240
        res = await asyncio.gather(
            *(
                http_stream(client, url, key, regions[0], PROMPTS[i % len(PROMPTS)], 16, 250)
                for i in range(burst)
            )
        )
        out["overload"] = {
            "requests": burst,
            "served_in_region": sum(r["status"] == 200 and r["region"] == regions[0] for r in res),
            "spilled": sum(r["status"] == 200 and r["region"] != regions[0] for r in res),
            "rejected": sum(r["status"] in (429, 503) for r in res),
            "failed": sum(r["status"] not in (200, 429, 503) for r in res),
        }
        print(f"  overload burst of {burst} from {regions[0]}: {out['overload']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default=os.environ.get("EDGERAY_TOPOLOGY") or "local")
    p.add_argument("--out", default="results/serve")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "torch"])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled tiny model)")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="16 requests per level, 16 tokens")
    p.add_argument(
        "--normal-concurrency",
        type=int,
        default=2,
        help="concurrent callers (spread over the regions) for the in-region fraction under normal load",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens = 16, 16
    from edgeray.model.bundled import bundled_model
    from edgeray.serve.engines import make_engine

    topo = load_topology(resolve_topology_path(args.topology))
    model = args.model or str(bundled_model())
    kind = make_engine(model, kind=args.engine).name if args.engine == "auto" else args.engine
    print(
        f"engine {kind}, model {model}, {args.requests} requests x {args.max_tokens} tokens per level",
        flush=True,
    )
    summary: dict[str, Any] = {
        "engine": kind,
        "requests_per_level": args.requests,
        "max_tokens": args.max_tokens,
    }
    summary["bare"] = asyncio.run(bare(model, kind, args.requests, args.max_tokens))

    from ray import serve

    from edgeray.serve.app import app

    key = secrets.token_urlsafe(16)
    os.environ["EDGERAY_API_KEYS"] = key
    with cluster.driver(topo, name=f"bench-serve-{os.getpid()}") as state:
        port = state.serve_port if state is not None else int(os.environ.get("EDGERAY_SERVE_PORT", "8000"))
        serve.start(http_options={"host": "127.0.0.2", "port": port})
        serve.run(
            app({"topology": str(topo.path), "model": model, "engine": kind}),
            name="regional",
            route_prefix="/",
            blocking=False,
        )
        base = f"http://127.0.0.2:{port}"
        _wait_ready(base, key, list(topo.regions))
        try:
            summary.update(
                asyncio.run(
                    through_serve(
                        base, key, list(topo.regions), args.requests, args.max_tokens, args.normal_concurrency
                    )
                )
            )
        finally:
            serve.shutdown()
    b8, s8 = summary["bare"]["8"], summary["serve"]["8"]
    overhead = summary["serve"]["1"]["ttft_p50_ms"] - summary["bare"]["1"]["ttft_p50_ms"]
    summary["targets"] = [
        {
            "target": "Serve p50 TTFT overhead over the bare engine <= 10 ms (c=1)",
            "met": overhead <= 10,
            "figures": f"+{overhead:.1f} ms",
        },
        {
            "target": "throughput >= 85% of bare at concurrency 8",
            "met": s8["tokens_per_s"] >= 0.85 * b8["tokens_per_s"],
            "figures": f"{s8['tokens_per_s'] / b8['tokens_per_s'] * 100:.0f}%",
        },
        {
            "target": ">= 99% in-region under normal load",
            "met": summary["in_region_fraction"] >= 0.99,
            "figures": f"{summary['in_region_fraction'] * 100:.1f}%",
        },
        {
            "target": "0 failed under overload",
            "met": summary["overload"]["failed"] == 0,
            "figures": json.dumps(summary["overload"]),
        },
    ]
    out = Path(args.out)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    print(f"\n{'':8} {'c':>3} {'TTFT p50':>9} {'TTFT p95':>9} {'e2e p95':>9} {'tok/s':>8}")
    for path in ("bare", "serve"):
        for c in LEVELS:
            s = summary[path][str(c)]
            print(
                f"{path:8} {c:3d} {s['ttft_p50_ms']:9.1f} {s['ttft_p95_ms']:9.1f} {s['e2e_p95_ms']:9.1f} "
                f"{s['tokens_per_s']:8.0f}"
            )
    print()
    for t in summary["targets"]:
        print(f"{'met ' if t['met'] else 'MISS'} {t['target']}: {t['figures']}")
    print(f"wrote {out / 'summary.json'}")
    return 0


def _wait_ready(base: str, key: str, regions: list[str], timeout_s: float = 300.0) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    for region in regions:  # every region's engine up (vLLM starts in ~20 s each)
        while True:
            try:
                r = requests.post(
                    f"{base}/v1/completions",
                    headers={
                        "Authorization": f"Bearer {key}",
                        "x-edgeray-region": region,
                        "x-edgeray-budget-ms": "60000",
                    },
                    json={"model": "edgeray-tiny", "prompt": "hi", "max_tokens": 1},
                    timeout=120,
                )
                if r.status_code == 200 and r.json()["edgeray"]["region"] == region:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"region {region} did not serve within {timeout_s:.0f} s")
            time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())

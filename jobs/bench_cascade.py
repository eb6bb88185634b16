"""Benchmark the serving cascade: quality against the large model vs the share of requests escalated vs
time to answer and modelled energy per request, over a held-out prompt set, through edgeray's real front
door and engine servers.

    python jobs/bench_cascade.py --out results/bench/cascade [--quick]

Stages (the local preset's tiers): the small model is an ONNX export of the bundled model (int8, and int4
as a weaker one) on campus (micro tier); the large model is the bundled model in fp32 on the torch engine
in metro (regional tier). Prompts: the opening words of standard-library docstrings, text the bundled model
never trained on (it trained on ``pydoc_data.topics``).

1. Each prompt is answered directly by every engine (greedy, ``--tokens`` tokens; the small ones with token
   log-probabilities and two alternatives): the small answers' confidence under both signals the front
   door offers (``min_margin``, ``mean_logprob``), the large answer (the reference), each call's time.
2. Every threshold on the confidence gives a cascade whose answers are known exactly from (1): a request
   under it is escalated. Per threshold: share escalated; agreement with the large model (tokens equal
   position by position); the large model's perplexity of the returned answers; time to answer (measured
   engine times plus the topology's modelled network to each stage); modelled energy per request (engine
   seconds x the serving node's busy power, from the topology); the large-only figures for comparison.
3. The chosen threshold (the highest that escalates at most ``--max-escalated``) is then run through the
   real front door (edgeray.serve.frontdoor, over HTTP), which must escalate exactly the predicted requests.

Calibration: across formats and signals, the chosen threshold with the best agreement (then the least
energy) is written to summary.json's ``calibration`` and printed as the ``serve run`` arguments that deploy it.
Writes DIR/summary.json, DIR/cascade.png (the quality / energy frontier) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import math
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeray.atomic import write_atomic
from edgeray.serve.config import CASCADE_SIGNALS
from edgeray.topology import load_topology, resolve_topology_path

SMALL_REGION, LARGE_REGION = "campus", "metro"
MODULES = ["json", "collections", "itertools", "functools", "pathlib", "re", "os", "shutil", "csv", "heapq",
           "bisect", "textwrap", "string", "random", "statistics", "fractions", "decimal", "datetime",
           "calendar", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "socket", "selectors",
           "threading", "queue", "sched", "subprocess", "argparse", "logging", "getpass", "tempfile",
           "glob", "fnmatch", "pickle", "copy", "pprint", "enum", "dataclasses", "contextlib", "abc",
           "typing", "inspect", "traceback", "warnings", "unittest", "doctest"]  # fmt: skip


def held_out_prompts(n: int, words: int = 6) -> list[str]:
    """The opening ``words`` words of functions' docstrings in standard-library modules, deterministic."""
    import importlib

    out: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            doc = inspect.getdoc(obj) if callable(obj) and not attr.startswith("_") else None
            text = " ".join((doc or "").split()[:words])
            if len(text.split()) == words and text not in out:
                out.append(text)
                break
        if len(out) == n:
            break
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _post(
    http: Any, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[dict, dict, float]:
    t0 = time.perf_counter()
    async with http.post(f"{url}/v1/completions", json=body, headers=headers) as r:
        data = await r.json()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {data}")
        return data, dict(r.headers), (time.perf_counter() - t0) * 1e3


def large_perplexity(model: Any, tok: Any, prompt: str, answer_ids: list[int]) -> float:
    import torch

    ids = tok(prompt)["input_ids"]
    if not answer_ids:
        return float("nan")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + answer_ids])).logits[0]
    logp = torch.log_softmax(logits[len(ids) - 1 : -1].float(), -1)
    nll = -logp[torch.arange(len(answer_ids)), torch.tensor(answer_ids)].mean()
    return float(math.exp(float(nll)))


def agreement(a: list[int], ref: list[int]) -> float:
    n = max(len(a), len(ref))
    return sum(x == y for x, y in zip(a, ref, strict=False)) / n if n else 1.0


async def measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import aiohttp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeray.model.bundled import bundled_model
    from edgeray.model.export_onnx import export_onnx
    from edgeray.serve.engine_server import EngineServer
    from edgeray.serve.frontdoor import answer_confidence

    topo = load_topology(resolve_topology_path("local"))
    model_dir = bundled_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    large_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = held_out_prompts(args.prompts)
    key = "bench"
    with tempfile.TemporaryDirectory() as scratch:
        smalls = {q: export_onnx(model_dir, Path(scratch) / q, quant=q) for q in args.small}
        servers = {f"onnx {q}": await EngineServer.start(Path(i.path).parent, engine="onnx", api_key=key)
                   for q, i in smalls.items()}  # fmt: skip
        servers["large"] = await EngineServer.start(model_dir, engine="torch", api_key=key)
        try:
            async with aiohttp.ClientSession() as http:
                auth = {"Authorization": f"Bearer {key}"}
                calls: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
                for i, p in enumerate(prompts):
                    body = {"model": "edgeray-tiny", "prompt": p, "max_tokens": args.tokens, "temperature": 0}
                    for name, server in servers.items():
                        extra = {"logprobs": 2} if name != "large" else {}
                        data, _, ms = await _post(http, server.url, {**body, **extra}, auth)
                        text = data["choices"][0]["text"]
                        calls[name].append({"text": text, "ids": tok(text, add_special_tokens=False)["input_ids"],
                                            "ms": ms, "confidence": {sig: answer_confidence("completions", data, sig)
                                                                     for sig in CASCADE_SIGNALS}})  # fmt: skip
                    print(f"  prompt {i + 1}/{len(prompts)} answered by {len(servers)} engines", flush=True)
                results = {
                    f"{name} / {sig}": sweep(name, sig, calls, prompts, topo, tok, large_model)
                    for name in calls
                    if name != "large"
                    for sig in CASCADE_SIGNALS
                }
                for label, res in results.items():
                    name, sig = label.split(" / ")
                    res["validated"] = await validate(
                        http, servers[name], servers["large"], topo, res["chosen"], sig, prompts, calls[name],
                        args, key,
                    )  # fmt: skip
                return {"prompts": prompts, "tokens": args.tokens, "results": results,
                        "large_only": results[next(iter(results))]["large_only"]}  # fmt: skip
        finally:
            for server in servers.values():
                await server.shutdown()


def sweep(name: str, signal: str, calls: dict[str, list[dict[str, Any]]], prompts: list[str], topo: Any,
          tok: Any, large_model: Any) -> dict[str, Any]:  # fmt: skip
    """Every threshold's cascade, computed exactly from the direct answers."""
    from edgeray.serve.routing import Router

    router = Router(topo)
    small_w = max(n.power.busy_w for n in topo.regions[SMALL_REGION].nodes)
    large_w = max(n.power.busy_w for n in topo.regions[LARGE_REGION].nodes)
    # the caller sits in campus: the small stage is in region, the large one a hop away (request + answer)
    net_small = 2 * router.network_ms(SMALL_REGION, SMALL_REGION, 512)
    net_large = 2 * router.network_ms(SMALL_REGION, LARGE_REGION, 512)
    small, large = calls[name], calls["large"]
    ppl_small = [large_perplexity(large_model, tok, p, c["ids"]) for p, c in zip(prompts, small, strict=True)]
    ppl_large = [large_perplexity(large_model, tok, p, c["ids"]) for p, c in zip(prompts, large, strict=True)]
    agree_small = [agreement(s["ids"], g["ids"]) for s, g in zip(small, large, strict=True)]
    conf = [c["confidence"][signal] for c in small]
    thresholds = sorted({-math.inf, *conf, math.inf})
    rows = []
    for t in thresholds:
        up = [c < t for c in conf]  # escalated
        ms = [
            s["ms"] + net_small + (g["ms"] + net_large if e else 0.0)
            for s, g, e in zip(small, large, up, strict=True)
        ]
        joules = [(s["ms"] * small_w + (g["ms"] * large_w if e else 0.0)) / 1e3 for s, g, e in zip(small, large, up, strict=True)]  # fmt: skip
        rows.append({
            "threshold": t if math.isfinite(t) else None,
            "threshold_label": f"{t:.4f}" if math.isfinite(t) else ("+inf" if t > 0 else "-inf"),
            "escalated": float(np.mean(up)),
            "agreement": float(np.mean([1.0 if e else a for a, e in zip(agree_small, up, strict=True)])),
            "perplexity_under_large": float(np.nanmean([pl if e else ps for ps, pl, e in zip(ppl_small, ppl_large, up, strict=True)])),
            "mean_ms": float(np.mean(ms)),
            "mean_joules": float(np.mean(joules)),
        })  # fmt: skip
    large_only = {
        "agreement": 1.0,
        "perplexity_under_large": float(np.nanmean(ppl_large)),
        "mean_ms": float(np.mean([g["ms"] + net_large for g in large])),
        "mean_joules": float(np.mean([g["ms"] * large_w / 1e3 for g in large])),
    }
    for r in rows:
        r["agreement_vs_large_only"] = r["agreement"] / large_only["agreement"]
        r["energy_vs_large_only"] = r["mean_joules"] / large_only["mean_joules"]
    within = [r for r in rows if r["escalated"] <= MAX_ESCALATED[0]]
    chosen = max(within, key=lambda r: (r["agreement"], -r["mean_joules"]))
    return {"rows": rows, "chosen": chosen, "large_only": large_only, "small_busy_w": small_w,
            "large_busy_w": large_w, "confidence": conf, "small_agreement": agree_small}  # fmt: skip


MAX_ESCALATED = [0.3]
"""The most requests the chosen threshold may escalate (``--max-escalated``)."""


async def validate(http: Any, small: Any, large: Any, topo: Any, chosen: dict[str, Any], signal: str,
                   prompts: list[str], small_calls: list[dict[str, Any]], args: argparse.Namespace,
                   key: str) -> dict[str, Any]:  # fmt: skip
    """Run the chosen threshold through the real front door: it must escalate exactly the predicted ones."""
    from edgeray.serve.config import ServeConfig
    from edgeray.serve.frontdoor import FrontDoor
    from edgeray.serve.routing import Replica, Router
    from edgeray.serve.torch_api import ACCEPTED

    t = chosen["threshold"]
    never = 0.0 if signal == "min_margin" else -1e9  # no answer is under it
    threshold = t if t is not None else never
    router = Router(topo, ttft_guess_ms=5)
    router.replicas["s"] = Replica("s", SMALL_REGION, "campus-gw", small.url, "onnx", 64, ACCEPTED)
    router.replicas["l"] = Replica("l", LARGE_REGION, "metro-mec-1", large.url, "torch", 64, ACCEPTED)
    cfg = ServeConfig(
        auth="open", port=_free_port(), localhost=False, cascade_threshold=threshold, cascade_signal=signal
    )
    door = FrontDoor(cfg, router, [], key)
    base = (await door.start("127.0.0.1"))[0]
    try:
        escalated, predicted, ms = [], [], []
        for p, c in zip(prompts, small_calls, strict=True):
            body = {"model": "edgeray-tiny", "prompt": p, "max_tokens": args.tokens, "temperature": 0}
            _, headers, took = await _post(
                http, base, body, {"x-edgeray-region": SMALL_REGION, "x-edgeray-budget-ms": "60000"}
            )
            escalated.append(headers["x-edgeray-region"] == LARGE_REGION)
            predicted.append(c["confidence"][signal] < threshold)
            ms.append(took)
        return {"threshold": threshold, "escalated": float(np.mean(escalated)),
                "matches_prediction": escalated == predicted, "mean_ms_measured_locally": float(np.mean(ms))}  # fmt: skip
    finally:
        await door.close()


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    lo = summary["large_only"]
    for name, res in summary["results"].items():
        rows = res["rows"]
        style = "o-" if name.endswith("min_margin") else "s--"
        for ax, x in zip(axes, ("energy_vs_large_only", "escalated"), strict=True):
            ax.plot(
                [r[x] for r in rows], [r["agreement"] for r in rows], style, ms=3, label=f"small = {name}"
            )
        c = res["chosen"]
        axes[0].plot([c["energy_vs_large_only"]], [c["agreement"]], "k*", ms=12)
        axes[1].plot([c["escalated"]], [c["agreement"]], "k*", ms=12)
    axes[0].plot([1.0], [lo["agreement"]], "s", color="#d62728", label="large only")
    axes[0].set_xlabel("modelled energy per request / large-only")
    axes[1].set_xlabel("share of requests escalated")
    for ax in axes:
        ax.set_ylabel("agreement with the large model")
        ax.axhline(0.95, color="#999", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].axvline(MAX_ESCALATED[0], color="#999", lw=0.8, ls=":")
    fig.suptitle(
        "cascade: campus (micro) small model, escalating to metro (regional) fp32; * = chosen threshold"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench/cascade")
    ap.add_argument("--prompts", type=int, default=40, help=f"held-out prompts (at most {len(MODULES)})")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    ap.add_argument("--small", default="int8,int4", help="small-model formats, comma-separated")
    ap.add_argument(
        "--max-escalated", type=float, default=0.3, help="calibration: escalate at most this share"
    )
    ap.add_argument("--quick", action="store_true", help="8 prompts x 8 tokens, int4 only (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.tokens, args.small = 8, 8, "int4"
    args.small = [q.strip() for q in args.small.split(",") if q.strip()]
    if not args.small or any(q not in ("fp32", "int8", "int4") for q in args.small):
        ap.error(f"--small {args.small}: give one or more of fp32, int8, int4")
    if not 1 <= args.prompts <= len(MODULES) or args.tokens < 1:
        ap.error(f"--prompts must be in [1, {len(MODULES)}] and --tokens positive")
    if not 0 <= args.max_escalated <= 1:
        ap.error("--max-escalated is a share in [0, 1]")
    MAX_ESCALATED[0] = args.max_escalated
    out = Path(args.out)
    summary = asyncio.run(measure(args, out))
    # calibration: the best agreement within the escalation cap, then the least energy, over formats and signals
    label, best = max(
        summary["results"].items(),
        key=lambda kv: (kv[1]["chosen"]["agreement"], -kv[1]["chosen"]["mean_joules"]),
    )
    quant, signal = label.removeprefix("onnx ").split(" / ")
    threshold = best["validated"]["threshold"]
    summary["calibration"] = {"onnx_quant": quant, "cascade_signal": signal, "cascade_threshold": threshold,
                              "max_escalated": args.max_escalated, **{k: best["chosen"][k] for k in
                              ("escalated", "agreement", "energy_vs_large_only", "mean_ms")}}  # fmt: skip
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "cascade.png")
    lo = summary["large_only"]
    print(f"\n{len(summary['prompts'])} held-out prompts x {summary['tokens']} tokens; large only: "
          f"{lo['mean_ms']:.1f} ms, {lo['mean_joules']:.3f} J, perplexity {lo['perplexity_under_large']:.2f}")  # fmt: skip
    print(
        f"{'small':10} {'threshold':>10} {'escal.':>7} {'agree':>7} {'x large':>8} {'ms':>7} {'J':>7} {'x large J':>9} {'ppl':>7}"
    )
    for name, res in summary["results"].items():
        rows = res["rows"]
        picks = {0, len(rows) - 1, rows.index(res["chosen"])} | {
            round(i * (len(rows) - 1) / 4) for i in range(5)
        }
        for i in sorted(picks):
            r = rows[i]
            star = " *" if r is res["chosen"] else ""
            print(f"{name:26} {r['threshold_label']:>10} {r['escalated']:7.2f} {r['agreement']:7.3f} "
                  f"{r['agreement_vs_large_only']:8.3f} {r['mean_ms']:7.1f} {r['mean_joules']:7.3f} "
                  f"{r['energy_vs_large_only']:9.3f} {r['perplexity_under_large']:7.2f}{star}")  # fmt: skip
        v = res["validated"]
        print(
            f"{name:10} through the front door at {v['threshold']:.4f}: escalated {v['escalated']:.2f}, "
            f"as predicted: {v['matches_prediction']}"
        )
    c = summary["calibration"]
    print(f"\ncalibrated (escalating at most {c['max_escalated']:.0%}): {c['escalated']:.0%} escalated, agreement "
          f"{c['agreement']:.3f}, energy {c['energy_vs_large_only']:.2f}x large-only. Serve it with:\n"
          f"  serve run edgeray.serve:app tier_engines=micro:onnx,device:onnx onnx_quant={c['onnx_quant']} "
          f"cascade_signal={c['cascade_signal']} cascade_threshold={c['cascade_threshold']:.6g}")  # fmt: skip
    print(f"\nwrote {out / 'summary.json'} and {out / 'cascade.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

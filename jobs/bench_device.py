"""Benchmark the device tier's engine: ONNX Runtime (fp32, int8, int4 exports) against the torch engine on
one CPU thread, for size, single-stream speed and agreement with the fp32 model.

    python jobs/bench_device.py --out results/bench/device [--quick]

For each preset (``tiny``: the bundled model, trained; ``small``: the preset at its seeded initialisation,
so its agreement figures describe quantisation error on random weights, not on a trained model):

- size: bytes on disk of each export against the fp32 parameters;
- speed: single-stream greedy decoding, one request at a time, through each engine's own API
  (edgeray.serve.engines): the torch engine (what edgeray's torch replicas run: every step recomputes the
  prefix), transformers' ``generate`` with its KV cache (for reference), and the onnx engine on each
  export; tokens per second over every prompt, the engines interleaved prompt by prompt so that machine
  noise falls on all of them alike;
- agreement with fp32 (the torch model): teacher-forced (at each position of held-out 64-token windows,
  the same next token as fp32) and free-running (the share of greedy continuations' tokens equal to
  fp32's, position by position).

Writes DIR/summary.json, DIR/device.png and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeray.atomic import write_atomic
from edgeray.model.export_onnx import QUANTS, export_onnx, size_ratio
from edgeray.serve.engines import BatchingEngine, Request, TorchEngine
from edgeray.serve.onnx_engine import OnnxEngine, OnnxSession

PROMPTS = [
    "The for statement",
    "A class definition",
    "Exceptions are raised",
    "The with statement",
    "Built-in functions",
    "Modules can import",
    "A list comprehension",
    "Generators yield",
]


def checkpoint(preset: str, scratch: Path) -> Path:
    from edgeray.model.bundled import bundled_model

    if preset == "tiny":
        return bundled_model()
    from transformers import AutoTokenizer

    from edgeray.model.presets import build_model, save_pretrained

    path = scratch / preset
    save_pretrained(build_model(preset, seed=0).eval(), AutoTokenizer.from_pretrained(bundled_model()), path)
    return path


async def _one(engine: BatchingEngine, ids: list[int], tokens: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    out = [t async for d in engine.stream(Request(ids, max_tokens=tokens)) for t in d.token_ids]
    return out, time.perf_counter() - t0


def speed(engines: dict[str, Any], prompts: list[list[int]], tokens: int) -> dict[str, dict[str, Any]]:
    """Single-stream greedy decoding, the engines interleaved prompt by prompt."""

    async def run() -> dict[str, dict[str, Any]]:
        for e in engines.values():
            if isinstance(e, BatchingEngine):
                await e.start()
        stats: dict[str, dict[str, Any]] = {n: {"tokens": 0, "seconds": 0.0, "outputs": []} for n in engines}
        try:
            for ids in prompts:
                for name, e in engines.items():
                    if isinstance(e, BatchingEngine):
                        out, dt = await _one(e, ids, tokens)
                    else:  # transformers' generate with its KV cache
                        t0 = time.perf_counter()
                        with torch.inference_mode():
                            gen = e.generate(
                                torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, use_cache=True
                            )
                        dt = time.perf_counter() - t0
                        out = gen[0, len(ids) :].tolist()
                    stats[name]["tokens"] += len(out)
                    stats[name]["seconds"] += dt
                    stats[name]["outputs"].append(out)
        finally:
            for e in engines.values():
                if isinstance(e, BatchingEngine):
                    await e.shutdown()
        for s in stats.values():
            s["tokens_per_s"] = s["tokens"] / s["seconds"]
        return stats

    return asyncio.run(run())


def teacher_forced(exports: dict[str, Any], windows: np.ndarray) -> dict[str, float]:
    mask = np.ones(windows.shape, np.int64)
    pos = np.tile(np.arange(windows.shape[1]), (windows.shape[0], 1))
    picks = {}
    for q, info in exports.items():
        s = OnnxSession(Path(info.path).parent)
        picks[q] = s.run(windows, mask, pos, s.empty_cache(windows.shape[0]))[0].argmax(-1)
    return {q: float((picks[q] == picks["fp32"]).mean()) for q in exports}


def free_running(outputs: dict[str, list[list[int]]], ref: str) -> dict[str, float]:
    def share(a: list[int], b: list[int]) -> float:
        n = max(len(a), len(b))
        return sum(x == y for x, y in zip(a, b, strict=False)) / n if n else 1.0

    return {
        name: float(np.mean([share(o, r) for o, r in zip(outs, outputs[ref], strict=True)]))
        for name, outs in outputs.items()
    }


def bench_preset(preset: str, out: Path, scratch: Path, tokens: int, prompts: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeray.model.shards import _windows

    ckpt = checkpoint(preset, scratch)
    print(f"[{preset}] exporting {ckpt} as {', '.join(QUANTS)}", flush=True)
    exports = {q: export_onnx(ckpt, out / "exports" / preset / q, quant=q) for q in QUANTS}
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = [tok(p)["input_ids"] for p in PROMPTS[:prompts]]
    engines: dict[str, Any] = {
        "torch engine": TorchEngine(ckpt),
        "transformers generate (KV cache)": AutoModelForCausalLM.from_pretrained(ckpt).eval(),
    }
    engines |= {f"onnx {q}": OnnxEngine(Path(info.path).parent) for q, info in exports.items()}
    torch.set_num_threads(1)
    print(f"[{preset}] single-stream decoding, {len(ids)} prompts x {tokens} tokens", flush=True)
    stats = speed(engines, ids, tokens)
    windows = np.array([w["input_ids"] for w in _windows(tok, 64)][::5][:40], dtype=np.int64)
    agree_tf = teacher_forced(exports, windows)
    agree_free = free_running({n: s["outputs"] for n, s in stats.items()}, "torch engine")
    base = stats["torch engine"]["tokens_per_s"]
    rows = []
    for name, s in stats.items():
        q = name.removeprefix("onnx ") if name.startswith("onnx ") else None
        info = exports.get(q) if q else None
        rows.append(
            {
                "engine": name,
                "tokens_per_s": s["tokens_per_s"],
                "speedup_vs_torch_engine": s["tokens_per_s"] / base,
                "weight_bytes": info.weight_bytes if info else exports["fp32"].fp32_bytes,
                "size_ratio_vs_fp32": size_ratio(info) if info else 1.0,
                "agreement_teacher_forced": agree_tf.get(q, 1.0) if q else 1.0,
                "agreement_free_running": agree_free[name],
                "tokens": s["tokens"],
                "seconds": s["seconds"],
            }
        )
    return {"preset": preset, "checkpoint": str(ckpt), "trained": preset == "tiny", "rows": rows}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        names = [
            r["engine"].replace("transformers generate (KV cache)", "HF generate\n(KV cache)")
            for r in res["rows"]
        ]
        speeds = [r["tokens_per_s"] for r in res["rows"]]
        bars = ax.bar(range(len(names)), speeds, color=["#888", "#bbb", "#1f77b4", "#2ca02c", "#d62728"])
        for bar, r in zip(bars, res["rows"], strict=True):
            ax.annotate(
                f"{r['weight_bytes'] / 2**20:.1f} MiB\n{100 * r['agreement_teacher_forced']:.1f}%",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=8,
            )  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_ylabel("tokens/s, one stream, 1 thread")
        ax.set_title(f"{res['preset']} (labels: weights, teacher-forced agreement)")
        ax.set_ylim(0, max(speeds) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench/device")
    ap.add_argument("--presets", default="tiny,small", help="comma-separated: tiny, tiny-8l, small")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--prompts", type=int, default=8, help=f"prompts per engine (at most {len(PROMPTS)})")
    ap.add_argument("--quick", action="store_true", help="tiny only, 3 prompts x 16 tokens (a smoke run)")
    args = ap.parse_args(argv)
    presets = ["tiny"] if args.quick else [p.strip() for p in args.presets.split(",") if p.strip()]
    tokens, prompts = (16, 3) if args.quick else (args.tokens, min(args.prompts, len(PROMPTS)))
    from edgeray.model.presets import PRESETS

    unknown = [p for p in presets if p not in PRESETS]
    if unknown or tokens < 1 or prompts < 1:
        ap.error(
            f"--presets {unknown}: valid presets are {sorted(PRESETS)}" if unknown else "positive counts"
        )
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as scratch:
        results = [bench_preset(p, out, Path(scratch), tokens, prompts) for p in presets]
    summary = {"tokens_per_prompt": tokens, "prompts": prompts, "threads": 1, "results": results}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot(results, out / "device.png")
    for res in results:
        print(f"\n{res['preset']} ({'trained' if res['trained'] else 'seeded initialisation'})")
        print(
            f"{'engine':34} {'tok/s':>8} {'x torch':>8} {'MiB':>7} {'x smaller':>9} {'agree tf':>9} {'agree run':>9}"
        )
        for r in res["rows"]:
            print(
                f"{r['engine']:34} {r['tokens_per_s']:8.1f} {r['speedup_vs_torch_engine']:8.2f} "
                f"{r['weight_bytes'] / 2**20:7.2f} {r['size_ratio_vs_fp32']:9.2f} "
                f"{100 * r['agreement_teacher_forced']:8.1f}% {100 * r['agreement_free_running']:8.1f}%"
            )
    print(f"\nwrote {out / 'summary.json'} and {out / 'device.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

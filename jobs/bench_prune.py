"""Memory and quality per deployable format of a model for the device tier: fp32, int8, int4, pruned, pruned
after a recovery fine-tune, and pruned + fine-tuned + int8.

    python jobs/bench_prune.py --out results/bench/prune [--quick]

The model is the bundled one (``tiny``, trained) and, for memory alone, the ``small`` preset at its seeded
initialisation (untrained: its loss is that of random weights). Pruning (edgeray.model.prune, activation
scores on calibration windows) keeps ``--mlp-keep`` of the MLP channels and ``--heads-keep`` of the query
heads in every layer; the recovery fine-tune is edgeray's own trainer, ``jobs/train_sync.py --strategy sync
--init-from PRUNED`` on the local preset's campus nodes (it starts and stops its own cluster). Each format
is exported to ONNX (edgeray.model.export_onnx) and measured there:

- weights on disk, and the memory one onnx replica needs (edgeray.serve.onnx_engine.memory_need: what the
  serving app checks against a node before placing it);
- loss and perplexity on fixed windows of the corpus (teacher-forced), and next-token agreement with fp32.

Writes DIR/summary.json, DIR/prune.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeray.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[1]


def windows(tok: Any, n: int, seq_len: int = 64, every: int = 7) -> np.ndarray:
    from edgeray.model.shards import _windows

    return np.array([w["input_ids"] for w in _windows(tok, seq_len)][::every][:n], dtype=np.int64)


def onnx_quality(export_dir: Path, rows: np.ndarray, ref_picks: np.ndarray | None) -> dict[str, float]:
    from edgeray.serve.onnx_engine import OnnxSession

    s = OnnxSession(export_dir)
    ids, target = rows[:, :-1], rows[:, 1:]
    mask = np.ones(ids.shape, np.int64)
    pos = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
    logits = s.run(ids, mask, pos, s.empty_cache(ids.shape[0]))[0].astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    loss = float(-np.take_along_axis(logp, target[..., None], -1).mean())
    picks = logits.argmax(-1)
    agree = float((picks == ref_picks).mean()) if ref_picks is not None else 1.0
    return {"loss": loss, "perplexity": float(np.exp(loss)), "agreement": agree, "picks": picks}


def recover(pruned: Path, out: Path, steps: int) -> Path:
    """Fine-tune ``pruned`` with edgeray's sync trainer; returns the run's checkpoint."""
    cmd = [sys.executable, str(ROOT / "jobs" / "train_sync.py"), "--strategy", "sync", "--init-from", str(pruned),
           "--out", str(out), "--steps", str(steps), "--topology", "local", "--nodes", "campus-gw,campus-jetson",
           "--evals", "2", "--batch-size", "8"]  # fmt: skip
    print(f"  recovery fine-tune: {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"the recovery fine-tune failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return out / "checkpoint"


def bench_model(name: str, ckpt: Path, out: Path, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeray.model.export_onnx import export_onnx, load_info
    from edgeray.model.presets import save_pretrained
    from edgeray.model.prune import prune_llama
    from edgeray.serve.onnx_engine import memory_need

    tok = AutoTokenizer.from_pretrained(ckpt)
    rows = windows(tok, args.windows)
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    calibration = torch.from_numpy(windows(tok, 16, every=11)[:, :-1])
    pruned, report = prune_llama(
        model,
        mlp_keep=args.mlp_keep,
        heads_keep=args.heads_keep,
        scores="activation",
        calibration=calibration,
    )
    pruned_dir = save_pretrained(pruned, tok, scratch / f"{name}-pruned")
    variants: dict[str, tuple[Path, str]] = {
        "fp32": (ckpt, "fp32"),
        "int8": (ckpt, "int8"),
        "int4": (ckpt, "int4"),
        "pruned": (pruned_dir, "fp32"),
    }
    if name == "tiny":
        tuned = recover(pruned_dir, scratch / f"{name}-recover", args.steps)
        variants |= {"pruned + fine-tune": (tuned, "fp32"), "pruned + fine-tune + int8": (tuned, "int8")}
    else:
        variants["pruned + int8"] = (pruned_dir, "int8")
    table = []
    ref_picks = None
    for label, (source, quant) in variants.items():
        target = out / "exports" / name / label.replace(" + ", "-").replace(" ", "-")
        info = export_onnx(source, target, quant=quant)
        q = onnx_quality(target, rows, ref_picks)
        if ref_picks is None:
            ref_picks = q["picks"]
        need = memory_need(load_info(target), args.max_model_len)
        table.append({
            "format": label,
            "weights_mib": info.weight_bytes / 2**20,
            "fp32_params": info.fp32_bytes // 4,
            "replica_memory_mib": need.total / 2**20,
            "loss": q["loss"],
            "perplexity": q["perplexity"],
            "agreement_with_fp32": q["agreement"],
        })  # fmt: skip
        print(f"  {name} {label}: {table[-1]['weights_mib']:.2f} MiB, loss {q['loss']:.3f}", flush=True)
    return {
        "model": name,
        "trained": name == "tiny",
        "prune": {"intermediate": report.intermediate, "heads": report.heads, "params": report.params},
        "rows": table,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = next(r for r in results if r["trained"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in res["rows"]:
        ax.plot(row["weights_mib"], row["perplexity"], "o", ms=8)
        ax.annotate(row["format"], (row["weights_mib"], row["perplexity"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("weights on disk (MiB)")
    ax.set_ylabel("perplexity on fixed corpus windows")
    ax.set_title(f"{res['model']}: size vs quality per format")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench/prune")
    ap.add_argument("--mlp-keep", type=float, default=0.5)
    ap.add_argument("--heads-keep", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=60, help="recovery fine-tune steps")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows of 64 tokens")
    ap.add_argument("--max-model-len", type=int, default=512, help="for the replica memory figure")
    ap.add_argument("--quick", action="store_true", help="tiny only, 8 fine-tune steps, 16 windows")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.windows = 8, 16
    from transformers import AutoTokenizer

    from edgeray.model.bundled import bundled_model
    from edgeray.model.presets import build_model, save_pretrained

    out = Path(args.out)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        results.append(bench_model("tiny", bundled_model(), out, scratch, args))
        if not args.quick:
            small = save_pretrained(build_model("small", seed=0), AutoTokenizer.from_pretrained(bundled_model()),
                                    scratch / "small")  # fmt: skip
            results.append(bench_model("small", small, out, scratch, args))
    summary = {
        "mlp_keep": args.mlp_keep,
        "heads_keep": args.heads_keep,
        "steps": args.steps,
        "results": results,
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot(results, out / "prune.png")
    for res in results:
        p = res["prune"]
        print(f"\n{res['model']} ({'trained' if res['trained'] else 'seeded initialisation: loss is untrained'}); "
              f"pruned: MLP {p['intermediate'][0]}->{p['intermediate'][1]}, heads {p['heads'][0]}->{p['heads'][1]}, "
              f"params {p['params'][0] / 1e6:.2f}M->{p['params'][1] / 1e6:.2f}M")  # fmt: skip
        print(f"{'format':28} {'weights MiB':>11} {'replica MiB':>11} {'loss':>7} {'ppl':>8} {'agree':>7}")
        for r in res["rows"]:
            print(f"{r['format']:28} {r['weights_mib']:11.2f} {r['replica_memory_mib']:11.0f} {r['loss']:7.3f} "
                  f"{r['perplexity']:8.2f} {100 * r['agreement_with_fp32']:6.1f}%")  # fmt: skip
    print(f"\nwrote {out / 'summary.json'} and {out / 'prune.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fuzz the regional serving app's HTTP API from its own OpenAPI description with schemathesis.

    python jobs/fuzz_serve.py --out results/fuzz [--engine torch|vllm] [--examples 400] [--quick]
    python jobs/fuzz_serve.py --url http://HOST:PORT --key KEY --out results/fuzz   # an app already running
    eval "$(edgeray env)"; ray job submit --working-dir . -- python jobs/fuzz_serve.py --out /tmp/fuzz --quick

Without ``--url`` it starts the app on the local fleet (or the cluster of RAY_ADDRESS / the job) with the
chosen engine, one replica per region, a 64-token context (``--max-model-len``). schemathesis reads ``GET /openapi.json`` (edgeray.serve.openapi) and
sends schema-valid and schema-violating requests to every operation (``--examples`` per operation and
phase, the routing headers included), checking that no answer is a server error (5xx), that every status
and content type is one the description declares, and that every body matches it (every error an OpenAI
error body). Each request has ``--request-timeout`` seconds: a hang is a failure. Afterwards every region
must still answer a plain request in its own region: a bad request fails only itself.

Writes DIR/summary.json (requests, statuses, server errors, non-conforming answers, time-outs, the regions'
health after), DIR/fuzz.har (every request and answer), DIR/junit.xml, DIR/statuses.png, and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgeray import cluster
from edgeray.atomic import write_atomic
from edgeray.topology import load_topology, resolve_topology_path

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def schemathesis_argv(
    base: str, key: str, out: Path, examples: int, seed: int, timeout_s: float, workers: int, phases: str
) -> list[str]:
    """The ``schemathesis run`` command line a user would type against ``base``."""
    exe = Path(sys.executable).with_name("schemathesis")
    return [
        str(exe) if exe.exists() else (shutil.which("schemathesis") or "schemathesis"),
        "run", f"{base}/openapi.json",
        "--header", f"Authorization: Bearer {key}",
        "--checks", CHECKS,
        "--max-examples", str(examples),
        "--seed", str(seed),
        "--workers", str(workers),
        "--request-timeout", str(timeout_s),
        "--phases", phases,
        "--suppress-health-check", "too_slow,filter_too_much",
        "--generation-database", "none",
        "--continue-on-failure",
        "--no-color",
        "--output-sanitize", "true",
        "--report", "junit,har",
        "--report-junit-path", str(out / "junit.xml"),
        "--report-har-path", str(out / "fuzz.har"),
    ]  # fmt: skip


def openai_error(body: Any) -> bool:
    """Whether an error answer's body is OpenAI's shape: ``{"error": {"message": str, "type": str, ...}}``."""
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


def tally(har: dict[str, Any]) -> dict[str, Any]:
    """Requests, statuses and error-body shapes from schemathesis's HAR report (every exchange it made)."""
    statuses: collections.Counter[str] = collections.Counter()
    per_op: dict[str, collections.Counter[str]] = {}
    bad_errors, server_errors = [], []
    for entry in har.get("log", {}).get("entries", []):
        req, resp = entry["request"], entry["response"]
        path = "/" + req["url"].split("/", 3)[-1].split("?", 1)[0]
        op = f"{req['method']} {path}"
        status = int(resp.get("status", 0))
        statuses[str(status)] += 1
        per_op.setdefault(op, collections.Counter())[str(status)] += 1
        text = resp.get("content", {}).get("text") or ""
        if status >= 500 or status == 0:
            server_errors.append({"op": op, "status": status, "body": text[:300]})
        elif status >= 400 and req["method"] != "HEAD":
            try:
                body = json.loads(text)
            except ValueError:
                body = None
            if not openai_error(body):
                bad_errors.append({"op": op, "status": status, "body": text[:300]})
    return {
        "requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "per_operation": {op: dict(sorted(c.items())) for op, c in sorted(per_op.items())},
        "server_errors": server_errors,
        "non_openai_error_bodies": bad_errors,
    }


def regions_still_serve(base: str, key: str, regions: list[str]) -> dict[str, str]:
    """Each region's answer to one plain request from that region after the fuzz: ``ok`` when served
    there, else what happened."""
    import requests

    health = {}
    for region in regions:
        try:
            r = requests.post(
                f"{base}/v1/completions",
                headers={"Authorization": f"Bearer {key}", "x-edgeray-region": region,
                         "x-edgeray-budget-ms": "60000"},
                json={"model": "edgeray-tiny", "prompt": "hello", "max_tokens": 2},
                timeout=120,
            )  # fmt: skip
            served = r.headers.get("x-edgeray-region")
            health[region] = (
                "ok" if r.status_code == 200 and served == region else f"{r.status_code} {served}"
            )
        except requests.RequestException as exc:
            health[region] = type(exc).__name__
    return health


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops: dict[str, dict[str, int]] = {}
    for op, counts in summary["per_operation"].items():
        # schemathesis also probes every path with each method it does not take: one row for all of those
        name = "other methods (405)" if set(counts) == {"405"} else op
        row = ops.setdefault(name, {})
        for code, n in counts.items():
            row[code] = row.get(code, 0) + n
    codes = sorted({c for v in ops.values() for c in v})
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.5 * len(ops)))
    left = [0] * len(ops)
    for code in codes:
        counts = [ops[op].get(code, 0) for op in ops]
        ax.barh(list(ops), counts, left=left, label=code)
        left = [a + b for a, b in zip(left, counts, strict=True)]
    ax.set_xlabel("requests")
    ax.set_title(
        f"schemathesis against the {summary['engine']} app: {summary['requests']} requests, "
        f"{len(summary['server_errors'])} server errors"
    )
    ax.legend(title="status", fontsize=8, ncols=min(len(codes), 6))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PASSES = {
    "routing": [],
    "engines": ["--header", "x-edgeray-budget-ms: 600000"],
}
"""Two passes: ``routing`` generates the routing headers too (most budgets it draws are too small to meet:
429 at the router); ``engines`` fixes a generous budget so that generated bodies reach the engines."""


def fuzz(base: str, key: str, regions: list[str], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    passes: dict[str, Any] = {}
    hars: list[dict[str, Any]] = []
    for name, extra in PASSES.items():
        where = (out / name).resolve()
        where.mkdir(exist_ok=True)
        argv = (
            schemathesis_argv(
                base, key, where, args.examples, args.seed, args.request_timeout, args.workers, args.phases
            )
            + extra
        )
        shown = [a if not a.startswith("Authorization") else "Authorization: Bearer ***" for a in argv]
        print(f"[{name}] $", " ".join(shown), flush=True)
        started = time.monotonic()
        with (where / "schemathesis.log").open("w") as log:
            # run in its output folder: schemathesis keeps a cache (.schemathesis/) in its working directory
            try:
                code = subprocess.run(
                    argv, stdout=log, stderr=subprocess.STDOUT, timeout=args.max_minutes * 60, cwd=where
                ).returncode
            except subprocess.TimeoutExpired:
                code = 124  # killed: its HAR may be cut short
        try:
            har = json.loads((where / "fuzz.har").read_text())
        except (OSError, ValueError):
            har = {"log": {"entries": []}}
        hars.append(har)
        counted = tally(har)
        log_text = (where / "schemathesis.log").read_text()
        passes[name] = {
            "exit_code": code,
            # a check that failed (a server error, an undeclared status or content type, a body off its
            # schema, a time-out) versus schemathesis failing in itself (a crash while generating)
            "check_failures": "= FAILURES =" in log_text or code == 124,
            "tool_errors": "= ERRORS =" in log_text,
            "seconds": round(time.monotonic() - started, 1),
            "requests": counted["requests"],
            "statuses": counted["statuses"],
            "schemathesis_tail": log_text[-3000:],
        }
        print(
            f"[{name}] {counted['requests']} requests, exit {code}: {counted['statuses']}",
            flush=True,
        )
    summary: dict[str, Any] = tally({"log": {"entries": [e for h in hars for e in h["log"]["entries"]]}})
    summary["passes"] = passes
    summary["exit_code"] = max(p["exit_code"] for p in passes.values())
    summary["check_failures"] = any(p["check_failures"] for p in passes.values())
    summary["tool_errors"] = any(p["tool_errors"] for p in passes.values())
    summary["seconds"] = sum(p["seconds"] for p in passes.values())
    summary["regions_after"] = regions_still_serve(base, key, regions)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default=os.environ.get("EDGERAY_TOPOLOGY") or "local")
    p.add_argument("--out", default="results/fuzz")
    p.add_argument("--engine", default="torch", choices=["torch", "vllm", "onnx"])
    p.add_argument("--examples", type=int, default=400, help="schemathesis --max-examples per operation")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--phases", default="examples,coverage,fuzzing", help="schemathesis phases (its --phases)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds; a request past it is a hang"
    )
    p.add_argument(
        "--max-minutes", type=float, default=40.0, help="bound on each schemathesis pass (past it: a failure)"
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=64,
        help="context of the app it starts: a schema-valid body generates at most this many tokens, so "
        "thousands of requests take minutes (max_tokens_limit is half of it)",
    )
    p.add_argument("--url", help="fuzz an app already running at this router address (needs --key)")
    p.add_argument("--key", help="an API key of the app at --url")
    p.add_argument("--quick", action="store_true", help="60 examples per operation")
    args = p.parse_args(argv)
    if args.quick:
        args.examples = 60
    if bool(args.url) != bool(args.key):
        p.error("--url and --key go together")
    topo = load_topology(resolve_topology_path(args.topology))
    regions = list(topo.regions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.url:
        summary = fuzz(args.url.rstrip("/"), args.key, regions, out, args) | {"engine": "(running app)"}
    else:
        from ray import serve

        from edgeray.serve.app import app
        from edgeray.serve.client import router_address, wait_until_serving

        key = secrets.token_urlsafe(16)
        os.environ["EDGERAY_API_KEYS"] = key
        with cluster.driver(topo, name=f"fuzz-serve-{os.getpid()}") as state:
            port = (
                state.serve_port if state is not None else int(os.environ.get("EDGERAY_SERVE_PORT", "8000"))
            )
            serve.start(proxy_location="Disabled")
            scaling = {"min_replicas": 1, "max_replicas": 1}
            config = {"topology": str(topo.path), "engine": args.engine, "port": port,
                      "default_scaling": scaling, "regions": {}, "max_model_len": args.max_model_len,
                      "max_tokens_limit": args.max_model_len // 2}  # fmt: skip
            serve.run(app(config), name="fuzz", route_prefix="/", blocking=False)
            try:
                print(f"starting the app ({args.engine} engine, one replica per region) ...", flush=True)
                base = router_address(port)
                wait_until_serving(base, key, regions)
                summary = fuzz(base, key, regions, out, args) | {"engine": args.engine}
            finally:
                serve.shutdown()
    served = all(v == "ok" for v in summary["regions_after"].values())
    summary["targets"] = [
        {"target": ">= 1000 generated requests", "met": summary["requests"] >= 1000,
         "figures": str(summary["requests"])},
        {"target": "0 server errors (5xx or no answer)", "met": not summary["server_errors"],
         "figures": str(len(summary["server_errors"]))},
        {"target": "every error an OpenAI error body", "met": not summary["non_openai_error_bodies"],
         "figures": str(len(summary["non_openai_error_bodies"]))},
        {"target": "schemathesis checks pass (status, content type, body schema, no time-out)",
         "met": summary["exit_code"] == 0 or (summary["exit_code"] == 1 and not summary["check_failures"]),
         "figures": f"exit {summary['exit_code']}, check failures: {summary['check_failures']}, "
                    f"schemathesis's own errors: {summary['tool_errors']}"},
        {"target": "every region still serves in region afterwards", "met": served,
         "figures": json.dumps(summary["regions_after"])},
    ]  # fmt: skip
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    plot(summary, out / "statuses.png")
    print(f"\n{'operation':28} statuses")
    for op, counts in summary["per_operation"].items():
        print(f"{op:28} {json.dumps(counts)}")
    print(f"\n{summary['requests']} requests in {summary['seconds']:.0f} s\n")
    for t in summary["targets"]:
        print(f"{'met ' if t['met'] else 'MISS'} {t['target']}: {t['figures']}")
    print(f"wrote {out / 'summary.json'}, {out / 'statuses.png'}, {out / 'fuzz.har'}")
    # the request count depends on --examples; any other miss is a defect the fuzz found
    return 0 if all(t["met"] for t in summary["targets"][1:]) else 1


if __name__ == "__main__":
    sys.exit(main())

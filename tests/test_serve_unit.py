"""Serving without a cluster: the torch engine and its HTTP server, routing, the front door's checks, config."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeray.model.bundled import bundled_model
from edgeray.serve.app import app
from edgeray.serve.autoscale import desired_replicas, p95_latency_policy
from edgeray.serve.config import ServeConfig
from edgeray.serve.engine_server import EngineServer
from edgeray.serve.engines import EngineError, Request, TorchEngine
from edgeray.serve.frontdoor import json_depth
from edgeray.serve.routing import Replica, Router
from edgeray.serve.torch_api import ACCEPTED
from edgeray.topology import load_topology

from .conftest import collect_streams

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(edgeray_home):
    return bundled_model()


def _greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_torch_engine_batches_requests_and_equals_greedy_generate(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = ["The for statement", "A class definition", "Exceptions are"]
    ids = [tok(p)["input_ids"] for p in prompts]
    # Different lengths in one batch (left padding) and different max_tokens: each equals generate alone.
    outs = collect_streams(
        TorchEngine(model_dir, max_batch=8),
        [Request(prompt_ids=i, max_tokens=n) for i, n in zip(ids, (6, 3, 8), strict=True)],
    )
    for prompt_ids, n, deltas in zip(ids, (6, 3, 8), outs, strict=True):
        got = [t for d in deltas for t in d.token_ids]
        want = _greedy(model, prompt_ids, n)  # generate stops at EOS too (its generation config says so)
        assert got == want
        assert deltas[-1].finish_reason == (
            "length" if len(want) == n and want[-1] != tok.eos_token_id else "stop"
        )
        assert "".join(d.text for d in deltas) == tok.decode(got, skip_special_tokens=True)


def test_seeded_sampling_equals_the_same_draws_by_hand(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok("The for")["input_ids"]
    runs = [
        collect_streams(
            TorchEngine(model_dir), [Request(prompt_ids=ids, max_tokens=8, temperature=0.9, seed=s)]
        )[0]
        for s in (1, 1, 2)
    ]
    tokens = [[t for d in r for t in d.token_ids] for r in runs]
    # Reference: softmax(logits / T) sampled with a generator seeded the same way, one token at a time.
    gen, seq, ref = torch.Generator().manual_seed(1), list(ids), []
    with torch.no_grad():
        for _ in range(len(tokens[0])):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            t = int(torch.multinomial(torch.softmax(logits / 0.9, -1), 1, generator=gen))
            ref.append(t)
            seq.append(t)
    assert tokens[0] == tokens[1] == ref
    assert tokens[2] != tokens[0]


def test_extreme_sampling_values_found_by_the_fuzz_are_greedy_not_errors(model_dir):
    """top_p = 5e-324 (schemathesis's pick: 0 in float32) once kept no token and a near-zero temperature
    overflowed the logits to nan; both are the limit of sampling: greedy decoding."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok("The for")["input_ids"]
    engine = TorchEngine(model_dir)
    extremes = [
        dict(temperature=1.0, top_p=5e-324),
        dict(temperature=1e-300),
        dict(temperature=5e-324, top_p=1e-9),
    ]
    runs = collect_streams(engine, [Request(prompt_ids=ids, max_tokens=6, seed=3, **kw) for kw in extremes])
    want = _greedy(model, ids, 6)
    for kw, run in zip(extremes, runs, strict=True):
        assert [t for d in run for t in d.token_ids] == want[: sum(len(d.token_ids) for d in run)], kw


def test_torch_engine_serves_a_mixtral_moe_checkpoint(model_dir, tmp_path):
    from edgeray.model.presets import save_pretrained
    from edgeray.train.moe import MoEConfig, build_moe_model

    torch.manual_seed(0)
    model = build_moe_model(MoEConfig(experts=4)).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    path = save_pretrained(model, tok, tmp_path / "moe")
    ids = tok("The for statement")["input_ids"]
    (deltas,) = collect_streams(TorchEngine(path), [Request(prompt_ids=ids, max_tokens=5)])
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(ref).__name__ == "MixtralForCausalLM"
    got = [t for d in deltas for t in d.token_ids]
    assert got == _greedy(ref, ids, 5)[: len(got)]


@pytest.fixture(scope="module")
def torch_server(model_dir):
    key = secrets.token_urlsafe(8)

    async def start():
        return await EngineServer.start(
            model_dir, engine="torch", host="127.0.0.1", api_key=key, timeout_s=120
        )

    server = asyncio.run(start())
    yield server, key
    asyncio.run(server.shutdown())


def test_torch_server_speaks_openai_with_stops_usage_and_token_prompts(torch_server, model_dir):
    server, key = torch_server
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    auth = {"Authorization": f"Bearer {key}"}
    url = server.url + "/v1/completions"
    ids = tok("The for statement")["input_ids"]
    greedy = tok.decode(_greedy(model, ids, 12), skip_special_tokens=True)
    body = {"model": "edgeray-tiny", "prompt": "The for statement", "max_tokens": 12, "temperature": 0}
    whole = requests.post(url, json=body, headers=auth, timeout=60).json()
    assert whole["choices"][0]["text"] == greedy and whole["usage"]["completion_tokens"] == 12
    # Token-id prompts are the same prompt.
    by_ids = requests.post(url, json={**body, "prompt": ids}, headers=auth, timeout=60).json()
    assert by_ids["choices"][0]["text"] == greedy
    # A stop string cuts the text before its first occurrence, with finish_reason "stop".
    stop = greedy.strip()[3:6]
    cut = requests.post(url, json={**body, "stop": [stop]}, headers=auth, timeout=60).json()["choices"][0]
    assert cut["text"] == greedy[: greedy.index(stop)] and cut["finish_reason"] == "stop"
    # Streaming: the same text, and the usage chunk when stream_options asks for it.
    stream = requests.post(
        url,
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        headers=auth,
        timeout=60,
        stream=True,
    )
    events = [
        json.loads(line[6:])
        for line in stream.iter_lines(decode_unicode=True)
        if line[6:] and line != "data: [DONE]"
    ]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == greedy
    assert events[-1]["usage"]["completion_tokens"] == 12 and events[-1]["choices"] == []
    # What the torch engine cannot honour is refused by name, never dropped; no key, no answer.
    bad = requests.post(url, json={**body, "echo": True}, headers=auth, timeout=60)
    assert bad.status_code == 400 and "echo" in bad.json()["error"]["message"]
    assert "echo" not in ACCEPTED["completions"]
    # logprobs: each generated token's log-probability under the model, and the top alternatives.
    lp = requests.post(url, json={**body, "logprobs": 2}, headers=auth, timeout=60).json()["choices"][0]
    gen = _greedy(model, ids, 12)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids + gen])).logits[0], -1)
    want = [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(gen)]
    assert lp["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-4)
    assert [max(top.values()) for top in lp["logprobs"]["top_logprobs"]] == pytest.approx(want, abs=1e-4)
    assert requests.post(url, json=body, timeout=60).status_code == 401
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    asyncio.run(server.check())


def test_router_prefers_own_region_then_nearest_then_cloud_and_respects_budget_load_health():
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    router = Router(topo, ttft_guess_ms=10)
    for region in topo.regions:
        router.replicas[region] = Replica(region, region, f"{region}-node", "http://x", "vllm", 2, ACCEPTED)
    assert router.candidates("campus") == ["campus", "metro", "cloud"]
    assert router.candidates("cloud")[0] == "cloud"
    choice, _ = router.choose("campus", 100, 1000, now=0)
    assert choice is not None and choice.region == "campus"
    # modelled network: campus LAN latency + bytes / bandwidth, each way
    link = topo.route("campus", "campus").link
    assert choice.network_in_ms == pytest.approx(link.latency_ms + 1000 * 8 / (link.bandwidth_mbps * 1e3))
    router.replicas["campus"].inflight = 2  # full: spill to the nearest region
    choice, skipped = router.choose("campus", 100, 1000, now=0)
    assert choice.region == "metro" and skipped == [("campus", "overloaded")]
    router.replicas["metro"].failed_until = 5.0  # failed a request before its first token
    choice, _ = router.choose("campus", 100, 1000, now=1.0)
    assert choice.region == "cloud"
    router.replicas["cloud"].healthy = False  # its probe failed
    choice, skipped = router.choose("campus", 100, 1000, now=1.0)
    assert choice is None and skipped == [
        ("campus", "overloaded"),
        ("metro", "unhealthy"),
        ("cloud", "unhealthy"),
    ]
    # A second campus replica with room takes the request; the least loaded one wins.
    router.replicas["campus-2"] = Replica(
        "campus-2", "campus", "campus-jetson", "http://y", "vllm", 2, ACCEPTED
    )
    choice, _ = router.choose("campus", 100, 1000, now=1.0)
    assert choice.replica.id == "campus-2"
    # A budget no region can meet: nothing chosen, every region explained.
    router.replicas["campus"].inflight = 0
    router.replicas["cloud"].healthy = True
    choice, skipped = router.choose("campus", 1.0, 1000, now=10.0)
    assert choice is None and [r for r, _ in skipped] == ["campus", "metro", "cloud"]
    assert all("budget" in why for _, why in skipped)
    # Replicas already tried for this request are excluded.
    choice, _ = router.choose("campus", 100, 1000, exclude=frozenset({"campus", "campus-2"}), now=10.0)
    assert choice.region == "metro"


def test_energy_preference_picks_the_fewest_expected_joules_within_the_budget():
    """prefer="energy": of the regions that meet the budget and are expected within energy_slack_ms of the
    fastest, the one whose node's busy power x expected time is least (campus-gw 25 W, metro-mec-1 180 W,
    cloud-1 400 W in clusters/local.yaml); a region the budget rules out is never chosen for its energy;
    prefer="latency" keeps the caller's own region."""
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    nodes = {"campus": "campus-gw", "metro": "metro-mec-1", "cloud": "cloud-1"}

    def router(prefer: str, slack: float | None = 5.0) -> Router:
        r = Router(topo, ttft_guess_ms=10, prefer=prefer, energy_slack_ms=slack)
        for region, node in nodes.items():
            r.replicas[region] = Replica(region, region, node, "http://x", "vllm", 2, ACCEPTED)
        return r

    green, fast = router("energy"), router("latency")
    choice, _ = green.choose("metro", 100, 200, now=0)
    assert choice.region == "campus" and fast.choose("metro", 100, 200, now=0)[0].region == "metro"
    assert green.expected_joules(choice) == pytest.approx(25 * 10 / 1e3)  # busy_w x 10 ms expected
    # A budget that campus's extra network time breaks: metro (180 W) beats cloud (400 W), which is also out.
    near = 10 + 2 * fast.network_ms("metro", "metro", 200)
    far = 10 + 2 * fast.network_ms("metro", "campus", 200)
    choice, skipped = green.choose("metro", (near + far) / 2, 200, now=0)
    assert choice.region == "metro" and [r for r, _ in skipped] == ["campus", "cloud"]
    # The slack bounds what a request gives up: campus is ~4.4 ms slower than metro for a metro caller.
    extra = far - near
    assert 4 < extra < 5
    assert router("energy", slack=extra - 0.1).choose("metro", 100, 200, now=0)[0].region == "metro"
    assert router("energy", slack=extra + 0.1).choose("metro", 100, 200, now=0)[0].region == "campus"
    # Measured times count: a campus ten times slower than metro costs more than metro's 180 W.
    anything = router("energy", slack=None)
    for _ in range(3):
        anything.latency["campus"].observe(100.0, now=0)
    assert anything.choose("metro", 1000, 200, now=0)[0].region == "metro"  # 25 x 0.1 > 180 x 0.01
    with pytest.raises(ValueError, match="prefer 'cheap'"):
        Router(topo, prefer="cheap")
    with pytest.raises(ValueError, match="prefer 'cheap'"):
        ServeConfig(prefer="cheap")


def test_old_latency_samples_expire_so_an_idle_region_is_probed_again():
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    router = Router(topo, ttft_guess_ms=10, window_s=10)
    for region in topo.regions:
        router.replicas[region] = Replica(region, region, "n", "http://x", "vllm", 4, ACCEPTED)
        for _ in range(3):  # three samples in the window: trusted (fewer fall back to the optimistic guess)
            router.latency[region].observe(20_000.0, now=0.0)  # e.g. an overload, long ago
    choice, _ = router.choose("campus", 100, 100, now=5.0)
    assert choice is None  # fresh samples say no region meets 100 ms
    choice, _ = router.choose("campus", 100, 100, now=11.0)
    assert choice is not None and choice.region == "campus"  # expired: probe it
    fresh = Router(topo, ttft_guess_ms=10)
    fresh.replicas["campus"] = Replica("campus", "campus", "n", "http://x", "vllm", 4, ACCEPTED)
    fresh.latency["campus"].observe(5_000.0, now=0.0)  # one slow first call alone does not count
    choice, _ = fresh.choose("campus", 100, 100, now=1.0)
    assert choice is not None and choice.region == "campus"
    for ms in (30.0, 40.0, 5_000.0):  # the median of three: one outlier does not count either
        fresh.latency["metro"].observe(ms, now=1.0)
    assert fresh.latency["metro"].estimate(2.0, 10.0, 10.0) == 40.0
    assert fresh.latency["metro"].p95(2.0, 10.0) == 5_000.0


def test_json_depth_counts_nesting_iteratively():
    assert json_depth({"a": 1}, 32) == 1
    assert json_depth({"a": [{"b": [1]}]}, 32) == 4
    deep: list = []
    cur = deep
    for _ in range(10_000):  # deeper than Python's recursion limit: still counted, and cut off at the limit
        cur.append([])
        cur = cur[0]
    assert json_depth({"x": deep}, 32) == 33


def test_p95_autoscaling_decision():
    assert desired_replicas(1, [500.0], 250.0) == 2
    assert desired_replicas(2, [1000.0, 100.0], 250.0) == 8
    assert desired_replicas(3, [50.0], 250.0) == 2
    assert desired_replicas(1, [50.0], 250.0) == 1
    assert desired_replicas(2, [], 250.0) == 2

    class Ctx:
        def __init__(self, metrics: dict) -> None:
            self.aggregated_metrics = metrics
            self.current_num_replicas = 2

    assert p95_latency_policy(Ctx({}))[0] == 2  # nothing measured yet: keep the size
    assert p95_latency_policy(Ctx({"p95_ttft_ms": {"r1": 600.0}, "target_p95_ms": {"r1": 250.0}}))[0] == 5


def test_config_errors_are_clear(monkeypatch):
    monkeypatch.delenv("EDGERAY_API_KEYS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="engine 'tensorrt': valid engines"):
        app({"engine": "tensorrt"})
    with pytest.raises(ValueError, match=r"tier 'moon': valid tiers are \['device', 'micro'"):
        app({"tier_engines": "moon:onnx"})
    with pytest.raises(ValueError, match=r"tier_engines\.device: engine 'tf'"):
        app({"tier_engines": {"device": "tf"}})
    with pytest.raises(ValueError, match=r"onnx_quant 'int3': valid formats are \['fp32', 'int8', 'int4'\]"):
        app({"onnx_quant": "int3"})
    with pytest.raises(ValueError, match="bogus"):
        app({"bogus": 1})
    with pytest.raises(
        ValueError, match=r"no API keys reached the app: `serve run edgeray\.serve:app` reads"
    ):
        app({})
    with pytest.raises(ValueError, match=r"regions \['mars'\] are not in topology 'local'"):
        app({"auth": "open", "regions": {"mars": {}}})
    assert ServeConfig().scaling("campus").capacity == 16


def test_engine_server_errors_name_the_problem(tmp_path, model_dir):
    async def start(path, engine):
        return await EngineServer.start(path, engine=engine, api_key="k")

    with pytest.raises(EngineError, match="valid engines are"):
        asyncio.run(start(model_dir, "tensorrt"))
    with pytest.raises(EngineError, match=r"\(no config.json\)"):
        asyncio.run(start(tmp_path, "torch"))


def test_the_openapi_description_admits_only_what_router_and_engine_accept():
    """Every body schemathesis draws from the router's description as valid passes the engine's own
    validation and the router's limits (model, max_tokens): the description is what is enforced, so an
    API fuzz's "valid" requests reach the engines. A value the description rules out is refused."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from jsonschema import Draft202012Validator

    from edgeray.serve import openapi
    from edgeray.serve.torch_api import ChatBody, CompletionBody

    models = {"completions": CompletionBody, "chat": ChatBody}
    limit = 32
    doc = openapi.document(
        engines=[openapi.engine_schemas(models)], model_name="edgeray-tiny", max_model_len=64,
        max_tokens_limit=limit, regions=["campus", "cloud"], version="test",
    )  # fmt: skip
    loaded = schemathesis.openapi.from_dict(doc)
    ops = sorted(f"{r.ok().method.upper()} {r.ok().path}" for r in loaded.get_all_operations())
    assert ops == sorted(
        [
            "GET /health",
            "GET /v1/models",
            "GET /edgeray/status",
            "POST /v1/completions",
            "POST /v1/chat/completions",
        ]
    )
    # The engines accept exactly the fields the description lists (the router refuses the others).
    for endpoint, name in openapi.SCHEMA_NAMES.items():
        assert sorted(doc["components"]["schemas"][name]["properties"]) == ACCEPTED[endpoint]

    def admitted(endpoint: str, body: dict) -> None:
        models[endpoint].model_validate(body)  # raises if the engine would refuse it
        assert body["model"] == "edgeray-tiny"
        for name in ("max_tokens", "max_completion_tokens"):
            assert body.get(name) is None or body[name] <= limit

    for endpoint, path in openapi.PATHS.items():

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=loaded[path]["POST"].as_strategy())
        def check(case):
            admitted(endpoint, case.body)  # noqa: B023 (run at once, inside this iteration)

        check()
    # And the other way: values the engines refuse are outside the description.
    validator = Draft202012Validator(
        {"$ref": "#/components/schemas/CompletionRequest", "components": doc["components"]}
    )
    good = {"model": "edgeray-tiny", "prompt": "hi"}
    assert validator.is_valid(good) and validator.is_valid({**good, "prompt": [[1, 2]]})
    for bad in ({"prompt": ""}, {"prompt": []}, {"prompt": ["a", "b"]}, {"prompt": [-1]}, {"model": "gpt-9"},
                {"max_tokens": limit + 1}, {"top_p": 0}, {"n": 2}, {"echo": True}, {"logprobs": 6}):  # fmt: skip
        assert not validator.is_valid({**good, **bad}), bad


def test_tcp_round_trip_reads_what_ss_reports():
    """edgeray.serve.frontdoor.tcp_rtt_ms (TCP_INFO read in-process) against iproute2's `ss -ti` (the kernel's
    inet_diag over netlink) for the same loopback connection: smoothed and lowest round trip."""
    import re
    import shutil
    import socket
    import subprocess

    from edgeray.serve.frontdoor import tcp_rtt_ms

    if shutil.which("ss") is None:
        pytest.skip("iproute2's ss is not installed")
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    with server, client, peer:
        for _ in range(5):  # a few data round trips, so both figures have samples
            client.sendall(b"x" * 100)
            peer.recv(100)
            peer.sendall(b"y" * 100)
            client.recv(100)
        port = client.getsockname()[1]
        shown = subprocess.run(["ss", "-tin", "src", f"127.0.0.1:{port}"], capture_output=True, text=True,
                               check=True, timeout=30).stdout  # fmt: skip
        rtt, minrtt = tcp_rtt_ms(client), tcp_rtt_ms(client, lowest=True)
    want_rtt = float(re.search(r"\brtt:([\d.]+)/", shown).group(1))
    want_min = float(re.search(r"\bminrtt:([\d.]+)", shown).group(1))
    assert rtt == pytest.approx(want_rtt, abs=0.0015) and minrtt == pytest.approx(want_min, abs=0.0015), shown
    assert tcp_rtt_ms(object()) is None  # not a socket: no figure, no exception


def test_an_ingress_takes_its_own_regions_callers_and_measures_the_network(torch_server):
    """A front door that is campus's ingress on a packet-level cluster, routing to a real torch engine
    server: its callers are in campus whatever they omit, a header naming another region is refused (400
    wrong_ingress), and the breakdown's network part is measured: the caller's connection (loopback here)
    and the path's round trip the registry measured, half their sum each way."""
    import aiohttp

    from edgeray.serve.config import key_hash
    from edgeray.serve.frontdoor import FrontDoor

    server, secret = torch_server
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    router = Router(topo)
    router.replicas["r"] = Replica(
        "r", "campus", "campus-gw", server.url, "torch", 4, server.accepted, rtt_ms=3.0
    )
    config = ServeConfig(topology="local", auth="open", host="127.0.0.1", localhost=False, port=_free_port())
    body = {"model": "edgeray-tiny", "prompt": "The forest", "max_tokens": 2, "stream": True}

    async def run() -> tuple[int, dict, dict]:
        door = FrontDoor(
            config, router, [key_hash("k")], secret, ingress_region="campus", measured_network=True
        )
        base = (await door.start("127.0.0.1"))[0]
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"{base}/v1/completions", json=body,
                                  headers={"x-edgeray-region": "metro"}) as r:  # fmt: skip
                    wrong = (r.status, await r.json())
                async with s.post(f"{base}/v1/completions", json=body) as r:
                    text = (await r.read()).decode()
                    headers = dict(r.headers)
        finally:
            await door.close()
        meta = json.loads(
            next(x for x in text.split("\n") if x.startswith(": edgeray "))[len(": edgeray ") :]
        )
        return wrong, headers, meta

    wrong, headers, meta = asyncio.run(run())
    assert wrong[0] == 400 and wrong[1]["error"]["code"] == "wrong_ingress", wrong
    assert "campus" in wrong[1]["error"]["message"] and "metro" in wrong[1]["error"]["message"]
    assert meta["caller_region"] == "campus" and meta["region"] == "campus" and not meta["spilled"], meta
    assert meta["network_clock"] == "measured" and headers["x-edgeray-network-clock"] == "measured"
    assert meta["path_rtt_ms"] == 3.0 and headers["x-edgeray-path-rtt-ms"] == "3.00"
    assert 0 < meta["caller_rtt_ms"] < 1.0, meta  # a loopback connection
    half = (meta["caller_rtt_ms"] + 3.0) / 2
    assert meta["network_in_ms"] == pytest.approx(half) and meta["network_out_ms"] == pytest.approx(half)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

"""Regional inference: per-region model replicas behind an OpenAI-compatible ingress that routes by region.

    eval "$(edgeray env)"
    serve run serve_apps/regional.yaml                  # or: serve run edgeray.serve:app
    curl -H "Authorization: Bearer $KEY" -H "x-edgeray-region: campus" \\
         127.0.0.2:8000/v1/completions -d '{"model": "edgeray-tiny", "prompt": "The for", "max_tokens": 8}'

One ``ModelReplica`` deployment per topology region, pinned by the region label, each with its own
autoscaling (``p95_latency_policy``), wraps an engine (vLLM or torch, edgeray.serve.engines). The ingress
(FastAPI) speaks the OpenAI API (GET /v1/models, POST /v1/completions and /v1/chat/completions, SSE
streaming, usage, OpenAI error bodies), checks API keys, validates, tokenizes, and routes:

- the caller's region is the ``x-edgeray-region`` header (unknown or missing: the configured default);
- candidates: that region, then the other non-cloud regions by topology path latency, then cloud regions;
- a region is skipped while it is unhealthy (a call failed before its first token: 10 s), full (its
  in-flight requests reached its capacity) or too slow: modelled network in + out (topology latency and
  bandwidth for the request / first-chunk bytes) + its recent queueing + its recent time to first token
  exceed the request's budget (``x-edgeray-budget-ms`` header, else the config default: 100 ms class for
  short prompts);
- no candidate left: 429 (every region busy or too slow; Retry-After) or 503 (none healthy), at once.

Responses carry the breakdown in ``x-edgeray-*`` headers (non-streaming) or in an ``edgeray`` field of the
last SSE chunk (streaming), and the ingress records the same figures in ``ray.util.metrics`` histograms
(``edgeray_serve_*_ms``, tagged by region: the p95 is visible on Ray's Prometheus endpoint).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from edgeray.placement import where
from edgeray.serve.engines import ENGINES, Engine, make_engine
from edgeray.serve.engines import Request as EngineRequest
from edgeray.topology import NODE_LABEL, REGION_LABEL, Tier, Topology, load_topology, resolve_topology_path

REGION_HEADER = "x-edgeray-region"
BUDGET_HEADER = "x-edgeray-budget-ms"
UNHEALTHY_S = 10.0
CHUNK_TOKENS = 4
CHUNK_MS = 50.0


# ---------------------------------------------------------------------------------------------- config
class RegionScaling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_p95_ms: float = Field(default=250.0, gt=0)
    capacity: int = Field(
        default=16, ge=1, description="in-flight requests per replica before the region spills"
    )


class ServeConfig(BaseModel):
    """``serve run`` args (serve_apps/regional.yaml); unknown keys are errors that list the valid ones."""

    model_config = ConfigDict(extra="forbid")
    topology: str = "local"
    model: str | None = Field(default=None, description="checkpoint directory; None = the bundled tiny model")
    model_name: str = "edgeray-tiny"
    engine: str = "auto"
    default_region: str | None = Field(default=None, description="region of callers without a valid header")
    budget_ms: float = Field(
        default=100.0, gt=0, description="default budget (first token) for short prompts"
    )
    long_prompt_tokens: int = Field(default=128, ge=1)
    long_budget_ms: float = Field(
        default=1000.0, gt=0, description="default budget for prompts over that length"
    )
    max_tokens_limit: int = Field(default=256, ge=1)
    first_token_timeout_s: float = Field(
        default=60.0, gt=0, description="a region that has not produced a first token by then is failed over"
    )
    auth: str = Field(default="required", description="'required' (API keys) or 'open' (local demo only)")
    api_keys_file: str | None = None
    regions: dict[str, RegionScaling] = Field(default_factory=dict)
    default_scaling: RegionScaling = Field(default_factory=lambda: RegionScaling())

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        if v not in ENGINES:
            raise ValueError(f"engine {v!r}: valid engines are {list(ENGINES)}")
        return v

    @field_validator("auth")
    @classmethod
    def _auth(cls, v: str) -> str:
        if v not in ("required", "open"):
            raise ValueError(f"auth {v!r}: valid values are 'required' and 'open'")
        return v

    def scaling(self, region: str) -> RegionScaling:
        return self.regions.get(region, self.default_scaling)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_api_keys(config: ServeConfig) -> frozenset[str]:
    """Keys from ``EDGERAY_API_KEYS`` (comma-separated) and ``api_keys_file`` (one per line), read where the
    application is built; the ingress receives only their SHA-256 hashes."""
    keys = {k.strip() for k in os.environ.get("EDGERAY_API_KEYS", "").split(",") if k.strip()}
    if config.api_keys_file:
        path = Path(config.api_keys_file).expanduser()
        if not path.exists():
            raise ValueError(f"api_keys_file {path}: no such file")
        keys |= {line.strip() for line in path.read_text().splitlines() if line.strip()}
    return frozenset(keys)


# ---------------------------------------------------------------------------------------------- replica
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, health_check_period_s=5)
class ModelReplica:
    """One region's model replica: an engine, streaming deltas with queueing and timing measured here."""

    async def __init__(self, region: str, model_dir: str, engine: str, target_p95_ms: float) -> None:  # type: ignore[misc]
        """Starts the engine here: the replica is ready (and routed to) only once it can generate, so no
        request's time to first token includes an engine start (vLLM: ~20 s)."""
        self.region = region
        self.engine: Engine = make_engine(model_dir, kind=engine, rpc_dir=os.environ.get("RAY_TMPDIR"))
        self.target_p95_ms = target_p95_ms
        self._ttft: deque[float] = deque(maxlen=200)
        self.node = where().get(NODE_LABEL, "?")
        await self.engine.start()

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream ``{"text", "tokens", "finish_reason"}`` chunks; the last also carries ``done`` and the
        timings. The first token goes out at once; later ones are coalesced (``CHUNK_TOKENS`` tokens or
        ``CHUNK_MS``), because every chunk costs CPU on each Serve hop (PLATFORM.md)."""
        arrived = time.perf_counter()
        request = EngineRequest(**payload)
        first: float | None = None
        n = 0
        text, tokens, flushed = "", 0, arrived
        finish: str | None = None
        async for delta in self.engine.stream(request):
            now = time.perf_counter()
            n += len(delta.token_ids)
            text += delta.text
            tokens += len(delta.token_ids)
            finish = delta.finish_reason
            if first is None:
                first = now
                self._ttft.append((now - arrived) * 1e3)
            elif finish is None and tokens < CHUNK_TOKENS and (now - flushed) * 1e3 < CHUNK_MS:
                continue
            if finish is not None:
                break
            yield {"text": text, "tokens": tokens, "finish_reason": None}
            text, tokens, flushed = "", 0, now
        end = time.perf_counter()
        yield {
            "text": text,
            "tokens": tokens,
            "finish_reason": finish,
            "done": True,
            "region": self.region,
            "node": self.node,
            "engine": self.engine.name,
            "completion_tokens": n,
            "ttft_ms": ((first or end) - arrived) * 1e3,
            "decode_ms": (end - (first or end)) * 1e3,
        }

    def _p95(self) -> dict[str, float]:
        if not self._ttft:
            return {"p95_ttft_ms": 0.0, "target_p95_ms": self.target_p95_ms}
        ordered = sorted(self._ttft)
        return {
            "p95_ttft_ms": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "target_p95_ms": self.target_p95_ms,
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self._p95()

    async def check_health(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------- routing
@dataclass
class RegionState:
    """What the ingress knows about one region: its load, recent latencies and health."""

    capacity: int
    inflight: int = 0
    unhealthy_until: float = 0.0
    samples: deque[tuple[float, float, float]] = field(default_factory=lambda: deque(maxlen=64))
    """(monotonic s, ttft ms, queue ms) of recent requests."""

    def estimate(self, now: float, window_s: float, default_ttft_ms: float) -> tuple[float, float]:
        """(queue, ttft) ms: medians over the samples of the last ``window_s`` seconds; with fewer than
        three, the optimistic (0, ``default_ttft_ms``). Old samples expire so that a past overload (or a
        first call's one-off costs) cannot keep a region shut out: an idle region gets probed again."""
        fresh = [(t, q) for ts, t, q in self.samples if ts >= now - window_s]
        if len(fresh) < 3:
            return 0.0, default_ttft_ms
        ttfts = sorted(t for t, _ in fresh)
        queues = sorted(q for _, q in fresh)
        return queues[len(queues) // 2], ttfts[len(ttfts) // 2]

    def observe(self, ttft_ms: float, queue_ms: float, now: float | None = None) -> None:
        self.samples.append((time.monotonic() if now is None else now, ttft_ms, queue_ms))


@dataclass(frozen=True)
class Choice:
    region: str
    network_in_ms: float
    network_out_ms: float
    expected_ms: float


class Router:
    """Region choice for a caller region and budget (pure apart from the clock; unit-tested)."""

    def __init__(
        self,
        topology: Topology,
        capacities: dict[str, int],
        *,
        ttft_guess_ms: float = 20.0,
        window_s: float = 10.0,
    ) -> None:
        self.topology = topology
        self.state = {r: RegionState(capacities.get(r, 16)) for r in topology.regions}
        self.ttft_guess_ms = ttft_guess_ms
        self.window_s = window_s

    def candidates(self, caller: str) -> list[str]:
        near = [r for r, _ in self.topology.nearest_regions(caller)]
        cloud = [r for r in near if self.topology.regions[r].tier is Tier.CLOUD and r != caller]
        return [r for r in near if r not in cloud] + cloud

    def network_ms(self, caller: str, region: str, nbytes: int) -> float:
        """Modelled one-way time for ``nbytes`` between the caller's region and ``region``."""
        link = self.topology.route(caller, region).link  # a region to itself: its intra-region link
        return link.latency_ms + nbytes * 8 / (link.bandwidth_mbps * 1e3)

    def choose(
        self, caller: str, budget_ms: float, request_bytes: int, *, now: float | None = None
    ) -> tuple[Choice | None, list[tuple[str, str]]]:
        """The first candidate that is healthy, has room and meets the budget; and why others were skipped."""
        now = time.monotonic() if now is None else now
        skipped: list[tuple[str, str]] = []
        for region in self.candidates(caller):
            st = self.state[region]
            if st.unhealthy_until > now:
                skipped.append((region, "unhealthy"))
                continue
            if st.inflight >= st.capacity:
                skipped.append((region, "overloaded"))
                continue
            net_in = self.network_ms(caller, region, request_bytes)
            net_out = self.network_ms(caller, region, 256)  # the first chunk
            queue, ttft = st.estimate(now, self.window_s, self.ttft_guess_ms)
            expected = net_in + net_out + queue + ttft
            if expected > budget_ms:
                skipped.append((region, f"expected {expected:.0f} ms > budget {budget_ms:.0f} ms"))
                continue
            return Choice(region, net_in, net_out, expected), skipped
        return None, skipped


# ---------------------------------------------------------------------------------------------- API
class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ("system", "user", "assistant"):
            raise ValueError(f"role {v!r}: valid roles are system, user, assistant")
        return v


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return f"{param}: {err['msg']}" if param else err["msg"], param


api = FastAPI(title="edgeray", docs_url=None, redoc_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        config: dict[str, Any],
        model_dir: str,
        replicas: dict[str, DeploymentHandle],
        key_hashes: list[str],
    ) -> None:
        from ray.util import metrics
        from transformers import AutoTokenizer

        self.config = ServeConfig(**config)
        self.topology = load_topology(resolve_topology_path(self.config.topology))
        self.key_hashes = list(key_hashes)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_model_len = 512
        cfg_file = Path(model_dir) / "config.json"
        if cfg_file.exists():
            self.max_model_len = int(json.loads(cfg_file.read_text()).get("max_position_embeddings", 512))
        self.replicas = {r: h.options(stream=True) for r, h in replicas.items()}
        self.router = Router(
            self.topology,
            {
                r: self.config.scaling(r).capacity * self.config.scaling(r).max_replicas
                for r in self.topology.regions
            },
        )
        self.default_region = self.config.default_region or next(iter(self.topology.regions))
        tags = ("region",)
        bounds = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4]
        self.hist = {
            name: metrics.Histogram(
                f"edgeray_serve_{name}_ms",
                description=f"{name} per request, ms",
                boundaries=bounds,
                tag_keys=tags,
            )
            for name in ("network", "queue", "ttft", "decode", "e2e")
        }
        self.counter = metrics.Counter(
            "edgeray_serve_requests", description="requests by outcome", tag_keys=("region", "outcome")
        )

    # -------------------------------------------------------------- endpoints
    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self._auth(request)
        except APIError as e:
            return e.response()
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "edgeray"}
                ],
            }
        )

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"ok": True, "regions": sorted(self.topology.regions)})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        try:
            self._auth(request)
            body = await self._body(request, CompletionBody)
            prompt = body.prompt if isinstance(body.prompt, str) else self._single(body.prompt)
            ids = self.tokenizer(prompt)["input_ids"]
            return await self._serve(request, "text_completion", ids, body.max_tokens, body)
        except APIError as e:
            return e.response()
        except Exception as exc:  # never a bare 500: an OpenAI-style body naming the problem
            return APIError(500, f"internal error: {exc!r}", type_="server_error").response()

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        try:
            self._auth(request)
            body = await self._body(request, ChatBody)
            messages = [m.model_dump() for m in body.messages]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            max_tokens = body.max_completion_tokens or body.max_tokens or 16
            return await self._serve(request, "chat.completion", ids, max_tokens, body)
        except APIError as e:
            return e.response()
        except Exception as exc:  # never a bare 500: an OpenAI-style body naming the problem
            return APIError(500, f"internal error: {exc!r}", type_="server_error").response()

    # -------------------------------------------------------------- helpers
    def _auth(self, request: Request) -> None:
        if self.config.auth == "open":
            return
        header = request.headers.get("authorization", "")
        key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        presented = key_hash(key)
        if not key or not any(hmac.compare_digest(presented, h) for h in self.key_hashes):
            raise APIError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>' with a key from EDGERAY_API_KEYS",
                type_="authentication_error",
                code="invalid_api_key",
            )

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            body = model.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise APIError(400, message, param=param) from None
        if body.model != self.config.model_name:  # type: ignore[attr-defined]
            raise APIError(
                404,
                f"model {body.model!r} does not exist; available: [{self.config.model_name!r}]",  # type: ignore[attr-defined]
                param="model",
                code="model_not_found",
            )
        return body

    @staticmethod
    def _single(prompts: list[str]) -> str:
        if len(prompts) != 1:
            raise APIError(
                400,
                f"prompt: give one prompt (got {len(prompts)}); batch prompts are not supported",
                param="prompt",
            )
        return prompts[0]

    async def _serve(self, request: Request, kind: str, ids: list[int], max_tokens: int, body: Any) -> Any:
        cfg = self.config
        if max_tokens > cfg.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens {max_tokens} is over this server's limit of {cfg.max_tokens_limit}",
                param="max_tokens",
            )
        if len(ids) + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
                f"{self.max_model_len} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        caller = request.headers.get(REGION_HEADER, self.default_region)
        if caller not in self.topology.regions:
            caller = self.default_region
        budget = self._budget(request, len(ids))
        started = time.perf_counter()
        payload = {
            "prompt_ids": ids,
            "max_tokens": max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "seed": body.seed,
        }
        tried: list[str] = []
        while True:
            choice, skipped = self.router.choose(caller, budget, len(json.dumps(payload)))
            skipped = [(r, why) for r, why in skipped if r not in tried] + [(r, "failed") for r in tried]
            if choice is None:
                self.counter.inc(tags={"region": caller, "outcome": "rejected"})
                reasons = "; ".join(f"{r}: {why}" for r, why in skipped)
                if all(why in ("unhealthy", "failed") for _, why in skipped):
                    raise APIError(
                        503,
                        f"no healthy region can serve this request ({reasons})",
                        type_="service_unavailable",
                        code="no_healthy_region",
                        headers={"Retry-After": "5"},
                    )
                raise APIError(
                    429,
                    f"no region can serve this request within its {budget:.0f} ms budget "
                    f"right now ({reasons})",
                    type_="rate_limit_error",
                    code="over_budget",
                    headers={"Retry-After": "1"},
                )
            state = self.router.state[choice.region]
            state.inflight += 1
            sent = time.perf_counter()
            stream: Any = self.replicas[choice.region].generate.remote(payload)
            try:
                # A failure (or silence) before the first token: mark the region unhealthy, try the next one.
                first = await asyncio.wait_for(stream.__anext__(), cfg.first_token_timeout_s)
            except StopAsyncIteration:
                first = {"done": True}
            except Exception:
                stream.cancel()
                state.inflight -= 1
                state.unhealthy_until = time.monotonic() + UNHEALTHY_S
                tried.append(choice.region)
                self.counter.inc(tags={"region": choice.region, "outcome": "failed_over"})
                continue
            break
        queue_ms = max(0.0, (time.perf_counter() - sent) * 1e3)  # refined below with the replica's own TTFT
        meta: dict[str, Any] = {
            "region": choice.region,
            "caller_region": caller,
            "budget_ms": budget,
            "network_in_ms": choice.network_in_ms,
            "network_out_ms": choice.network_out_ms,
            "spilled": choice.region != caller,
            "skipped": [f"{r}: {why}" for r, why in skipped],
            "prompt_tokens": len(ids),
        }
        rid = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        released = False

        def release() -> None:
            """Give the region its in-flight slot back, exactly once (a client may hang up mid-stream)."""
            nonlocal released
            if not released:
                released = True
                state.inflight -= 1

        def finish(done: dict[str, Any]) -> dict[str, Any]:
            release()
            total = (time.perf_counter() - started) * 1e3
            ttft = float(done.get("ttft_ms", 0.0))
            queue = max(0.0, queue_ms - ttft)
            state.observe(ttft, queue)
            out: dict[str, Any] = {
                **meta,
                "node": done.get("node"),
                "engine": done.get("engine"),
                "queue_ms": queue,
                "ttft_ms": ttft,
                "decode_ms": float(done.get("decode_ms", 0.0)),
                "e2e_ms": total + choice.network_in_ms + choice.network_out_ms,
            }
            tags = {"region": choice.region}
            self.hist["network"].observe(float(choice.network_in_ms + choice.network_out_ms), tags=tags)
            self.hist["queue"].observe(float(queue), tags=tags)
            self.hist["ttft"].observe(ttft, tags=tags)
            self.hist["decode"].observe(float(out["decode_ms"]), tags=tags)
            self.hist["e2e"].observe(float(out["e2e_ms"]), tags=tags)
            self.counter.inc(
                tags={"region": choice.region, "outcome": "spilled" if meta["spilled"] else "served"}
            )
            return out

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            yield first
            async for c in stream:
                yield c

        if body.stream:
            return StreamingResponse(
                self._sse(kind, rid, created, chunks(), finish, release, len(ids)),
                media_type="text/event-stream",
                headers={
                    "x-edgeray-region": choice.region,
                    "x-edgeray-spilled": str(meta["spilled"]).lower(),
                },
            )
        text, finish_reason, done = "", None, {}
        try:
            async for c in chunks():
                text += c.get("text", "")
                finish_reason = c.get("finish_reason") or finish_reason
                if c.get("done"):
                    done = c
                    break
        except Exception as exc:
            release()
            raise APIError(
                502, f"region {choice.region} failed mid-generation: {exc}", type_="server_error"
            ) from None
        breakdown = finish(done)
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": done.get("completion_tokens", 0),
            "total_tokens": len(ids) + done.get("completion_tokens", 0),
        }
        if kind == "text_completion":
            choice_body: dict[str, Any] = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice_body = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        headers = {
            f"x-edgeray-{k.replace('_', '-')}": (
                f"{v:.2f}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)
            )
            for k, v in breakdown.items()
            if k not in ("skipped",)
        }
        return JSONResponse(
            {
                "id": rid,
                "object": kind,
                "created": created,
                "model": self.config.model_name,
                "choices": [choice_body],
                "usage": usage,
                "edgeray": breakdown,
            },
            headers=headers,
        )

    def _budget(self, request: Request, prompt_tokens: int) -> float:
        raw = request.headers.get(BUDGET_HEADER)
        if raw is None:
            cfg = self.config
            return cfg.budget_ms if prompt_tokens <= cfg.long_prompt_tokens else cfg.long_budget_ms
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise APIError(
                400, f"{BUDGET_HEADER} {raw!r}: give a positive number of milliseconds", param=BUDGET_HEADER
            )
        return value

    async def _sse(
        self,
        kind: str,
        rid: str,
        created: int,
        chunks: AsyncIterator[dict[str, Any]],
        finish: Any,
        release: Any,
        prompt_tokens: int,
    ) -> AsyncIterator[str]:
        obj = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
        first = True
        try:
            async for c in chunks:
                if c.get("text") or c.get("finish_reason"):
                    if kind == "text_completion":
                        choice: dict[str, Any] = {
                            "index": 0,
                            "text": c["text"],
                            "logprobs": None,
                            "finish_reason": c["finish_reason"],
                        }
                    else:
                        delta: dict[str, Any] = {"content": c["text"]}
                        if first:
                            delta["role"] = "assistant"
                        choice = {"index": 0, "delta": delta, "finish_reason": c["finish_reason"]}
                    first = False
                    body = {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": self.config.model_name,
                        "choices": [choice],
                    }
                    yield f"data: {json.dumps(body)}\n\n"
                if c.get("done"):
                    breakdown = finish(c)
                    usage = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": c.get("completion_tokens", 0),
                        "total_tokens": prompt_tokens + c.get("completion_tokens", 0),
                    }
                    last = {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": self.config.model_name,
                        "choices": [],
                        "usage": usage,
                        "edgeray": breakdown,
                    }
                    yield f"data: {json.dumps(last)}\n\n"
                    break
        except Exception as exc:  # mid-stream failure: tell the client in-band, then end the stream
            err = {
                "error": {
                    "message": f"generation failed: {exc}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
            yield f"data: {json.dumps(err)}\n\n"
        finally:  # also when the client hangs up (the generator is closed): free the region's slot
            release()
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------- builder
def app(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve application builder (``serve run edgeray.serve:app`` / serve_apps/regional.yaml)."""
    from edgeray.model.bundled import bundled_model

    try:
        config = ServeConfig(**(args or {}))
    except ValidationError as exc:
        raise ValueError(f"serve config: {exc}") from None
    topology = load_topology(resolve_topology_path(config.topology))
    if config.default_region is not None:
        topology.region(config.default_region)  # raises, listing the regions
    unknown = set(config.regions) - set(topology.regions)
    if unknown:
        raise ValueError(
            f"serve config regions {sorted(unknown)} are not in topology {topology.name!r}: "
            f"valid regions are {sorted(topology.regions)}"
        )
    keys = load_api_keys(config)
    if config.auth == "required" and not keys:
        raise ValueError(
            "auth is 'required' but no API keys are set: export EDGERAY_API_KEYS=key1,key2 (or set "
            "api_keys_file), or set auth: open for a local demo"
        )
    model_dir = str(Path(config.model).expanduser().resolve()) if config.model else str(bundled_model())
    if not (Path(model_dir) / "config.json").exists():
        raise ValueError(f"model {model_dir}: not a Hugging Face checkpoint directory (no config.json)")
    replicas = {}
    for region in topology.regions:
        scaling = config.scaling(region)
        replicas[region] = ModelReplica.options(  # type: ignore[attr-defined]
            name=f"model-{region}",
            ray_actor_options={"num_cpus": 0, "label_selector": {REGION_LABEL: region}},
            autoscaling_config={
                "min_replicas": scaling.min_replicas,
                "initial_replicas": max(scaling.min_replicas, 1),
                "max_replicas": scaling.max_replicas,
                "upscale_delay_s": 5,
                "downscale_delay_s": 60,
                "metrics_interval_s": 2,
                "look_back_period_s": 10,
                "policy": {"policy_function": "edgeray.serve.autoscale:p95_latency_policy"},
            },
            max_ongoing_requests=scaling.capacity,
        ).bind(region, model_dir, config.engine, scaling.target_p95_ms)
    hashes = sorted(key_hash(k) for k in keys)
    return Ingress.bind(config.model_dump(), model_dir, replicas, hashes)  # type: ignore[attr-defined]

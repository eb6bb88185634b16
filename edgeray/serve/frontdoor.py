"""The region router's HTTP front door: checks the caller, chooses a replica, then relays its bytes.

No Ray hop on the token stream: the router is a plain asyncio HTTP server (aiohttp) running inside a Serve
replica, and each regional replica runs its engine's own HTTP server (edgeray.serve.engine_server). Per
request the router

1. answers ``GET /health`` without a key (``{"status": "ok"}``, nothing else) and requires
   ``Authorization: Bearer <key>`` everywhere else (401); ``GET /edgeray/status`` lists the replicas it
   routes to (region, node, engine, health, requests in flight, engine server pid), ``GET /openapi.json``
   describes the API (edgeray.serve.openapi);
2. refuses bodies over ``max_body_bytes`` (413), bodies that are not a JSON object or nest deeper than
   ``max_json_depth`` (400), body fields the serving engine does not honour (400 naming them), and
   ``max_tokens`` over ``max_tokens_limit`` (400); large bodies are parsed off the event loop;
3. chooses a replica (edgeray.serve.routing: own region, nearest, cloud; healthy, not full, in budget) or
   answers 429 / 503 with Retry-After at once;
4. forwards the body unchanged to that replica's engine server (the router's own secret replaces the
   caller's key) and relays the response bytes as they come: one read and one write per chunk, no parsing.

Failure semantics. A replica that refuses the connection, resets it or stays silent past
``first_token_timeout_s`` before its first byte is marked failed for ``FAILED_S`` and the request moves to
the next region: nothing has reached the caller yet. Once bytes flow, a broken upstream ends that stream
with an in-band SSE error event (streaming) or, for non-streaming requests, which are buffered, moves on as
well. An engine's 4xx (a bad request) goes to that caller unchanged and marks nothing. After a 5xx the
router probes that replica at once (the engine's own ``/health``): failing, the replica is marked failed and
the request moves on; healthy, the 5xx was this request's alone and is passed on with a generic body. Only
the engine's health decides that a region is unhealthy. A caller that hangs up releases its
replica slot and closes the upstream connection, which aborts the generation.

Cascade (``cascade_threshold`` set): a non-streaming request is first answered by the nearest replica of a
small tier (``cascade_tiers``, default device and micro: e.g. the onnx engine, ``tier_engines``), asked
for its tokens' log-probabilities with two alternatives. Its confidence, ``cascade_signal``: ``min_margin``
(the smallest gap between a token's best and second-best log-probability) or ``mean_logprob``, decides:
at or over the threshold the answer is returned (with only the log-probabilities the caller asked for);
under it, the request goes to the larger tiers with what is left of its budget, and if none can answer in
time the small answer is kept. Headers say what happened: ``x-edgeray-cascade`` (``small: ...``,
``large: ...``, and why), ``-confidence``, ``-threshold``, ``-signal``, ``-cascade-small-ms``. Streaming
requests skip the cascade (it needs the whole answer) and say so (``x-edgeray-cascade: off: stream``).

Breakdown: response headers ``x-edgeray-region``, ``-node``, ``-engine``, ``-caller-region``, ``-spilled``,
``-budget-ms``, ``-network-in-ms``, ``-network-out-ms``, ``-network-clock`` (measured: and ``-caller-rtt-ms``,
``-path-rtt-ms``), ``-expected-ms``. The network
part is ``modelled`` (the topology's one-way times) on a loopback cluster, where nothing real is crossed, and
``measured`` on a ``--wan`` cluster (edgeray.wan): half the caller connection's kernel round trip plus half the
router-to-replica path's, each way; there ``ttft_ms`` is the engine's part (the router's time to the first
byte less the path's round trip) and ``e2e_ms`` adds the caller's own round trip. Non-streaming
responses add ``-ttft-ms`` (here: time to the whole body), ``-e2e-ms`` and ``-energy-j`` (edgeray.energy's
request_joules: the node's busy power over the request's engine time, shared among the requests in flight on
its replica); a stream ends with the SSE comment ``: edgeray {...}`` (ignored by SSE clients) carrying
``ttft_ms``, ``decode_ms``, ``e2e_ms`` and ``energy_j``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from edgeray.energy import request_joules
from edgeray.serve import openapi
from edgeray.serve.config import ServeConfig, key_hash
from edgeray.serve.routing import FAILED_S, Choice, Replica, Router
from edgeray.topology import Tier

REGION_HEADER = "x-edgeray-region"
BUDGET_HEADER = "x-edgeray-budget-ms"
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
PARSE_IN_THREAD_BYTES = 64 << 10
DONE = b"data: [DONE]\n\n"
STATUS_PATH = "/edgeray/status"
OPENAPI_PATH = "/openapi.json"
METHODS: dict[str, tuple[str, ...]] = {
    "/health": ("GET", "HEAD"),
    OPENAPI_PATH: ("GET", "HEAD"),
    "/v1/models": ("GET",),
    STATUS_PATH: ("GET",),
    **{path: ("POST",) for path in ENDPOINTS},
}
"""Every path the router answers and the methods each takes (405 with ``Allow`` for the others)."""
OPEN_PATHS = ("/health",)
"""Paths answered without an API key: liveness only, so an unkeyed caller learns nothing (not even the
model, the regions or the API description)."""


TCPI_RTT_OFFSET, TCPI_MIN_RTT_OFFSET = 68, 148
"""Byte offsets in Linux's ``struct tcp_info`` (linux/tcp.h): ``tcpi_rtt`` (smoothed) and ``tcpi_min_rtt``
(the lowest sample of the connection), both u32 microseconds."""


def tcp_rtt_ms(sock: Any, *, lowest: bool = False) -> float | None:
    """The kernel's round-trip time of a connected TCP socket (``TCP_INFO``), in ms: smoothed, or with
    ``lowest`` the lowest sample it saw. None where it cannot be read."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        us = struct.unpack_from("I", info, TCPI_MIN_RTT_OFFSET if lowest else TCPI_RTT_OFFSET)[0]
    except (OSError, AttributeError, struct.error):
        return None
    return float(us) / 1e3


@dataclass(frozen=True)
class Network:
    """One request's network part. ``clock="modelled"``: the topology's one-way times between the caller's
    region and the replica's (loopback clusters, where nothing real is crossed). ``clock="measured"`` (a
    ``--wan`` cluster): half the caller connection's round trip plus half the router-to-replica path's, each
    way, from the kernel's TCP round-trip times (the caller's: the lowest its connection saw; the path's:
    edgeray.serve.app's handshakes)."""

    in_ms: float
    out_ms: float
    clock: str
    caller_rtt_ms: float = 0.0
    upstream_rtt_ms: float = 0.0


class APIError(Exception):
    """An OpenAI-style error answer: status, message, param; never exception text or a traceback."""

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

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status, headers=self.headers)


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, iteratively (stops counting past ``limit``)."""
    depth, level = 0, [value]
    while level and depth <= limit:
        depth += 1
        nxt: list[Any] = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, list):
                nxt.extend(v)
        level = [v for v in nxt if isinstance(v, dict | list)]
    return depth


PROBE_TOP = 2
"""Alternatives per token the cascade asks its small stage for: the runner-up gives ``min_margin``."""


def _token_tops(endpoint: str, answer: dict[str, Any]) -> list[tuple[float, list[float]]]:
    """(chosen token's log-probability, its position's top alternatives' log-probabilities) per token."""
    out: list[tuple[float, list[float]]] = []
    for choice in answer.get("choices", []):
        lp = choice.get("logprobs") or {}
        if endpoint == "completions":
            tops = lp.get("top_logprobs") or []
            for i, v in enumerate(lp.get("token_logprobs") or []):
                if v is not None:
                    alts = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
                    out.append((v, sorted(alts.values(), reverse=True)))
        else:
            for t in lp.get("content") or []:
                out.append(
                    (t["logprob"], sorted((a["logprob"] for a in t.get("top_logprobs") or []), reverse=True))
                )
    return out


def answer_confidence(endpoint: str, answer: dict[str, Any], signal: str = "min_margin") -> float:
    """The cascade's signal over the answer's generated tokens. ``mean_logprob``: their mean log-probability
    (0 when there are none). ``min_margin``: the smallest gap between a position's best and second-best
    log-probability (how close the model came to another token; +inf when there are no tokens)."""
    tokens = _token_tops(endpoint, answer)
    if signal == "mean_logprob":
        return sum(v for v, _ in tokens) / len(tokens) if tokens else 0.0
    margins = [alts[0] - alts[1] for _, alts in tokens if len(alts) >= 2]
    return min(margins) if margins else math.inf


def _trim_logprobs(endpoint: str, answer: dict[str, Any], wanted: Any) -> None:
    """Give the caller the log-probabilities it asked for (none, or ``wanted`` alternatives), not the probe's."""
    for choice in answer.get("choices", []):
        lp = choice.get("logprobs")
        if lp is None:
            continue
        if endpoint == "completions":
            if wanted is None:
                choice["logprobs"] = None
            else:
                lp["top_logprobs"] = [
                    dict(sorted(t.items(), key=lambda kv: -kv[1])[: int(wanted)])
                    if isinstance(t, dict)
                    else t
                    for t in lp.get("top_logprobs") or []
                ]
        elif wanted is None:
            choice["logprobs"] = None
        else:
            for t in lp.get("content") or []:
                t["top_logprobs"] = (t.get("top_logprobs") or [])[: int(wanted)]


class FrontDoor:
    """The router's HTTP server. ``observe`` receives each served request's breakdown (metrics)."""

    def __init__(
        self,
        config: ServeConfig,
        router: Router,
        key_hashes: list[str],
        secret: str,
        *,
        observe: Callable[[dict[str, Any]], None] | None = None,
        probe: Callable[[Replica], None] | None = None,
        check: Callable[[Replica], Awaitable[bool]] | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        reject: Callable[[int, str], None] | None = None,
        ingress_region: str | None = None,
        measured_network: bool = False,
    ) -> None:
        """``ingress_region``: this front door is that region's ingress (a ``--wan`` cluster): its callers are
        in that region, whatever they say. ``measured_network``: the network is real (a ``--wan`` cluster), so
        the breakdown's network part is measured (the caller's connection and the path to the replica, from
        the kernel's TCP round-trip times) instead of modelled from the topology."""
        self.config = config
        self.ingress_region = ingress_region
        self.measured_network = measured_network
        self.router = router
        self.key_hashes = list(key_hashes)
        self.secret = secret
        self.observe = observe or (lambda _: None)
        self.probe = probe or (lambda _: None)
        self.check = check
        self.status = status or (lambda: {})
        self.reject = reject or (lambda status, code: None)
        self.default_region = config.default_region or next(iter(router.topology.regions))
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None
        self.addresses: list[str] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str) -> list[str]:
        """Listen on ``host:port`` (fatal if taken) and, when asked and free, on ``127.0.0.1:port``."""
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        port = self.config.port
        try:
            await web.TCPSite(self.runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await self.close()
            raise OSError(
                f"the region router cannot listen on {host}:{port} ({exc.strerror}): another server (Serve's "
                "own HTTP proxy? set proxy_location: Disabled) or another cluster's app holds it; set the "
                "app's `port` arg to a free port (`edgeray env` prints EDGERAY_SERVE_PORT)"
            ) from None
        self.addresses = [f"http://{host}:{port}"]
        if self.config.localhost and host != "127.0.0.1":
            with contextlib.suppress(OSError):
                await web.TCPSite(self.runner, "127.0.0.1", port, reuse_address=True).start()
                self.addresses.append(f"http://127.0.0.1:{port}")
        return self.addresses

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.session is not None:
            await self.session.close()

    # ------------------------------------------------------------------ request handling
    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            path, method = request.path, request.method
            if path not in OPEN_PATHS:
                self._auth(request)
            allowed = METHODS.get(path)
            if allowed is None:
                raise APIError(404, f"no route {method} {path}", code="not_found")
            if method not in allowed:
                raise APIError(
                    405,
                    f"{path} takes {', '.join(allowed)}",
                    code="method_not_allowed",
                    headers={"Allow": ", ".join(allowed)},
                )
            if path == "/health":
                return web.json_response({"status": "ok"})
            if path == OPENAPI_PATH:
                return web.json_response(self._openapi())
            if path == "/v1/models":
                return await self._models()
            if path == STATUS_PATH:
                return web.json_response(self.status())
            endpoint = ENDPOINTS[path]
            raw, body = await self._body(request)
            self._check_fields(endpoint, body)
            if self.config.cascade_threshold is not None:
                return await self._cascade(request, endpoint, raw, body)
            return await self._proxy(request, raw, body)
        except APIError as e:
            self.reject(e.status, str(e.code or e.type))
            return e.response()

    def _auth(self, request: web.Request) -> None:
        if self.config.auth == "open":
            return
        header = request.headers.get("authorization", "")
        key = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""
        presented = key_hash(key)
        if not key or not any(hmac.compare_digest(presented, h) for h in self.key_hashes):
            raise APIError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>' with a key the app was given "
                "(EDGERAY_API_KEYS or api_keys_file)",
                type_="authentication_error",
                code="invalid_api_key",
            )

    def _openapi(self) -> dict[str, Any]:
        from edgeray import __version__

        engines = [r.schemas for r in self.router.replicas.values() if r.schemas]
        return openapi.document(
            engines=engines,
            model_name=self.config.model_name,
            max_model_len=self.config.max_model_len,
            max_tokens_limit=self.config.max_tokens_limit,
            regions=list(self.router.topology.regions),
            version=__version__,
        )

    async def _models(self) -> web.Response:
        card = {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "edgeray",
                "max_model_len": self.config.max_model_len}  # fmt: skip
        return web.json_response({"object": "list", "data": [card]})

    async def _body(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise APIError(
                413, f"request body of {request.content_length} bytes is over the limit of {limit}"
            )
        raw = bytearray()
        async for chunk in request.content.iter_any():
            raw += chunk
            if len(raw) > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes")
        data = bytes(raw)
        try:
            body = (
                await asyncio.to_thread(json.loads, data)
                if len(data) > PARSE_IN_THREAD_BYTES
                else json.loads(data)
            )
        except RecursionError:
            raise APIError(
                400, f"request body nests deeper than {self.config.max_json_depth} levels"
            ) from None
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        if json_depth(body, self.config.max_json_depth) > self.config.max_json_depth:
            raise APIError(400, f"request body nests deeper than {self.config.max_json_depth} levels")
        return data, body

    def _check_fields(self, endpoint: str, body: dict[str, Any]) -> None:
        replicas = list(self.router.replicas.values())
        if not replicas:
            return  # nothing registered yet: routing answers 503 below
        # Fields every registered engine honours: where they may differ, a request can go to any of them.
        accepted = set.intersection(*(set(r.accepted.get(endpoint, [])) for r in replicas))
        unknown = sorted(set(body) - accepted)
        if unknown:
            engines = "/".join(sorted({r.engine for r in replicas}))
            raise APIError(
                400,
                f"unsupported parameter(s) {unknown} for {endpoint} with the {engines} engine; "
                f"supported: {sorted(accepted)}",
                param=unknown[0],
                code="unsupported_parameter",
            )
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            # 40.0 is 40 to the engines' validation: floats are held to the limit too
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and value > self.config.max_tokens_limit
            ):
                raise APIError(
                    400,
                    f"{name} {value} is over this server's limit of {self.config.max_tokens_limit}",
                    param=name,
                )

    def _budget(self, request: web.Request, nbytes: int) -> float:
        raw = request.headers.get(BUDGET_HEADER)
        if raw is None:
            cfg = self.config
            return cfg.budget_ms if nbytes <= cfg.long_prompt_bytes else cfg.long_budget_ms
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0 or value == float("inf"):
            raise APIError(
                400, f"{BUDGET_HEADER} {raw!r}: give a positive number of milliseconds", param=BUDGET_HEADER
            )
        return value

    def _reject(self, budget: float, skipped: list[tuple[str, str]]) -> APIError:
        reasons = "; ".join(f"{r}: {why}" for r, why in skipped)
        if all(why in ("unhealthy", "failed") for _, why in skipped):
            return APIError(
                503,
                f"no healthy region can serve this request ({reasons})",
                type_="service_unavailable",
                code="no_healthy_region",
                headers={"Retry-After": "5"},
            )
        return APIError(
            429,
            f"no region can serve this request within its {budget:.0f} ms budget right now ({reasons})",
            type_="rate_limit_error",
            code="over_budget",
            headers={"Retry-After": "1"},
        )

    def _caller(self, request: web.Request) -> str:
        said = request.headers.get(REGION_HEADER)
        if self.ingress_region is not None:
            if said is not None and said != self.ingress_region:
                raise APIError(
                    400,
                    f"{REGION_HEADER} {said!r}: this is region {self.ingress_region}'s ingress, whose callers are "
                    f"in {self.ingress_region}; send region {said}'s requests to its own ingress (GET "
                    f"{STATUS_PATH} lists them) or drop the header",
                    param=REGION_HEADER,
                    code="wrong_ingress",
                )
            return self.ingress_region
        caller = said or self.default_region
        return caller if caller in self.router.topology.regions else self.default_region

    async def _cascade(
        self, request: web.Request, endpoint: str, raw: bytes, body: dict[str, Any]
    ) -> web.StreamResponse:
        """Answer from the nearest small-tier replica first; escalate to a larger tier when the answer's
        confidence (``cascade_signal``) is under ``cascade_threshold``, within what is left of the budget. Streaming
        requests skip the cascade (the decision needs the whole answer) and are routed as usual."""
        cfg = self.config
        assert cfg.cascade_threshold is not None
        if body.get("stream"):
            return await self._proxy(request, raw, body, note={"cascade": "off: stream"})
        small = frozenset(Tier(t) for t in cfg.cascade_tiers)
        large = frozenset(Tier) - small
        budget = self._budget(request, len(raw))
        started = time.perf_counter()
        probe = dict(body)
        if endpoint == "completions":
            wanted = body.get("logprobs")
            probe["logprobs"] = max(int(wanted or 0), PROBE_TOP)
        else:
            wanted = body.get("top_logprobs", 0) if body.get("logprobs") else None
            probe |= {"logprobs": True, "top_logprobs": max(int(wanted or 0), PROBE_TOP)}
        try:
            first = await self._proxy(request, json.dumps(probe).encode(), probe, tiers=small, budget=budget)
        except APIError as exc:  # no small-tier region can take it: straight to the larger tiers
            out = await self._proxy(request, raw, body, tiers=large, budget=budget)
            out.headers["x-edgeray-cascade"] = f"large: no small-tier region ({exc.message})"
            return out
        assert isinstance(first, web.Response) and first.body is not None
        if first.status != 200:
            return first  # the request's own error (4xx), or a failure the proxy already reported
        answer = json.loads(bytes(first.body))  # type: ignore[arg-type]
        confidence = answer_confidence(endpoint, answer, cfg.cascade_signal)
        spent_ms = (time.perf_counter() - started) * 1e3
        verdict = {
            "x-edgeray-confidence": f"{confidence:.4f}",
            "x-edgeray-threshold": f"{cfg.cascade_threshold:g}",
            "x-edgeray-signal": cfg.cascade_signal,
            "x-edgeray-cascade-small-ms": f"{spent_ms:.2f}",
        }
        why = ""
        if confidence < cfg.cascade_threshold:
            left = budget - spent_ms
            try:
                if left <= 0:
                    raise APIError(429, f"the small tier's answer used the whole {budget:.0f} ms budget")
                out = await self._proxy(request, raw, body, tiers=large, budget=left)
            except APIError as exc:
                why = f"small: kept, escalation impossible ({exc.message})"
            else:
                out.headers.update(verdict | {"x-edgeray-cascade": "large: confidence under threshold"})
                # the request's energy is both stages': the small answer was computed too
                small_j = float(first.headers.get("x-edgeray-energy-j", 0))
                large_j = float(out.headers.get("x-edgeray-energy-j", 0))
                out.headers["x-edgeray-cascade-small-energy-j"] = f"{small_j:.2f}"
                out.headers["x-edgeray-energy-j"] = f"{small_j + large_j:.2f}"
                return out
        _trim_logprobs(endpoint, answer, wanted)
        headers = {k: v for k, v in first.headers.items() if k.lower().startswith("x-edgeray-")}
        headers |= verdict | {"x-edgeray-cascade": why or "small: confidence at or over threshold"}
        return web.json_response(answer, headers=headers)

    async def _proxy(
        self,
        request: web.Request,
        raw: bytes,
        body: dict[str, Any],
        *,
        tiers: frozenset[Tier] | None = None,
        budget: float | None = None,
        note: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        """Route and relay one request. ``tiers``: only regions of these tiers; ``budget``: the first-token
        budget in ms (default: the request's header or the config's); ``note``: more ``x-edgeray-*`` headers."""
        assert self.session is not None
        caller = self._caller(request)
        budget = self._budget(request, len(raw)) if budget is None else budget
        stream = bool(body.get("stream"))
        started = time.perf_counter()
        headers = {"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"}
        if rid := request.headers.get("x-request-id"):
            headers["x-request-id"] = rid
        tried: set[str] = set()
        failed: list[tuple[str, str]] = []
        while True:
            choice, skipped = self.router.choose(
                caller, budget, len(raw), exclude=frozenset(tried), tiers=tiers
            )
            if choice is None:
                raise self._reject(budget, skipped + failed)
            replica = choice.replica
            replica.inflight += 1
            try:
                sent = time.perf_counter()
                upstream = await self._open(replica, request.path, raw, headers)
                if upstream is None:  # failed before its first byte: try the next region
                    tried.add(replica.id)
                    failed.append((choice.region, "failed"))
                    continue
                resp, first = upstream
                net = self._network(request, choice)
                meta = self._meta(choice, caller, budget, skipped + failed, net) | (note or {})
                if resp.status >= 500 and not await self._still_healthy(replica):
                    resp.close()  # the engine failed, not the request: nothing sent yet, try the next region
                    tried.add(replica.id)
                    failed.append((choice.region, "failed"))
                    continue
                if resp.status >= 400:
                    return await self._error(resp, first, replica, meta)
                if not stream:
                    out = await self._whole(resp, first, replica, net, meta, sent, started)
                    if out is None:
                        tried.add(replica.id)
                        failed.append((choice.region, "failed"))
                        continue
                    return out
                return await self._relay(request, resp, first, choice, net, meta, sent, started)
            finally:
                replica.inflight -= 1

    async def _still_healthy(self, replica: Replica) -> bool:
        """After a 5xx: ask the replica's health probe at once. Unhealthy: the replica is marked failed."""
        if self.check is None or await self.check(replica):
            return True
        replica.healthy = False
        replica.failed_until = time.monotonic() + FAILED_S
        self.probe(replica)
        return False

    async def _open(
        self, replica: Replica, path: str, raw: bytes, headers: dict[str, str]
    ) -> tuple[aiohttp.ClientResponse, bytes] | None:
        """POST to the replica and wait for its first body bytes; None (replica marked failed) when it refuses,
        resets or stays silent past ``first_token_timeout_s``."""
        assert self.session is not None
        session = self.session
        opened: list[aiohttp.ClientResponse] = []

        async def first_bytes() -> tuple[aiohttp.ClientResponse, bytes]:
            resp = await session.post(replica.url + path, data=raw, headers=headers)
            opened.append(resp)
            return resp, await resp.content.readany()

        try:
            return await asyncio.wait_for(first_bytes(), self.config.first_token_timeout_s)
        except (aiohttp.ClientError, OSError, TimeoutError, asyncio.TimeoutError):
            for resp in opened:
                resp.close()
            replica.failed_until = time.monotonic() + FAILED_S
            self.probe(replica)
            return None

    def _network(self, request: web.Request, choice: Choice) -> Network:
        """The request's network part: measured where the network is real and the path to the replica has
        been measured (edgeray.serve.app's registry loop times a TCP handshake to each replica every second),
        else modelled."""
        upstream = choice.replica.rtt_ms
        if not self.measured_network or upstream is None:
            return Network(choice.network_in_ms, choice.network_out_ms, "modelled")
        # the caller connection's lowest round trip: its smoothed one counts the client's delayed ACKs of
        # the streamed chunks (measured: up to 4 ms on a 0.4 ms link)
        sock = request.transport.get_extra_info("socket") if request.transport else None
        caller = tcp_rtt_ms(sock, lowest=True) if sock is not None else None
        caller = caller or 0.0
        half = (caller + upstream) / 2
        return Network(half, half, "measured", caller, upstream)

    def _meta(
        self, choice: Choice, caller: str, budget: float, skipped: list[tuple[str, str]], net: Network
    ) -> dict[str, Any]:
        r = choice.replica
        return {
            "region": choice.region,
            "node": r.node,
            "engine": r.engine,
            "caller_region": caller,
            "spilled": choice.region != caller,
            "budget_ms": budget,
            "network_in_ms": net.in_ms,
            "network_out_ms": net.out_ms,
            "network_clock": net.clock,
            **(
                {"caller_rtt_ms": net.caller_rtt_ms, "path_rtt_ms": net.upstream_rtt_ms}
                if net.clock == "measured"
                else {}
            ),
            "expected_ms": choice.expected_ms,
            "skipped": [f"{reg}: {why}" for reg, why in skipped],
        }

    @staticmethod
    def _headers(meta: dict[str, Any]) -> dict[str, str]:
        out = {}
        for k, v in meta.items():
            if k == "skipped":
                continue
            text = f"{v:.2f}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)
            out[f"x-edgeray-{k.replace('_', '-')}"] = text
        return out

    async def _error(
        self, resp: aiohttp.ClientResponse, first: bytes, replica: Replica, meta: dict[str, Any]
    ) -> web.Response:
        """The engine's own 4xx goes to the caller; a 5xx gets a generic body and a health probe."""
        try:
            rest = await asyncio.wait_for(resp.read(), 30)
        except (aiohttp.ClientError, OSError, TimeoutError):
            rest = b""
        finally:
            resp.release()
        headers = self._headers(meta)
        self.reject(resp.status, "engine_server_error" if resp.status >= 500 else "engine")
        if resp.status >= 500:
            self.probe(replica)
            return APIError(
                500,
                f"the engine in region {replica.region} failed this request; retry, or report it with the "
                "x-request-id header",
                type_="server_error",
                headers=headers,
            ).response()
        return web.Response(
            body=first + rest, status=resp.status, content_type="application/json", headers=headers
        )

    async def _whole(
        self,
        resp: aiohttp.ClientResponse,
        first: bytes,
        replica: Replica,
        net: Network,
        meta: dict[str, Any],
        sent: float,
        started: float,
    ) -> web.Response | None:
        try:
            rest = await asyncio.wait_for(resp.read(), self.config.first_token_timeout_s * 10)
        except (aiohttp.ClientError, OSError, TimeoutError):
            replica.failed_until = time.monotonic() + FAILED_S
            self.probe(replica)
            return None
        finally:
            resp.release()
        now = time.perf_counter()
        meta |= {
            "ttft_ms": (now - sent) * 1e3 - net.upstream_rtt_ms,
            "e2e_ms": self._e2e(net, started, now),
            "energy_j": self._joules(replica, now - sent - net.upstream_rtt_ms / 1e3),
        }
        self.observe(meta)
        return web.Response(
            body=first + rest,
            status=resp.status,
            content_type="application/json",
            headers=self._headers(meta),
        )

    def _joules(self, replica: Replica, engine_s: float) -> float:
        """The request's energy on its node (edgeray.energy.request_joules); 0 for a node the topology
        does not know (a replica registered by another app's topology)."""
        node = self.router.topology.nodes.get(replica.node)
        return 0.0 if node is None else request_joules(node, engine_s, replica.inflight)

    @staticmethod
    def _e2e(net: Network, started: float, now: float) -> float:
        """The caller's view: the router's time plus what the router's clock does not see (modelled: the
        whole network part; measured: the caller's own connection, the path to the replica being inside)."""
        unseen = net.caller_rtt_ms if net.clock == "measured" else net.in_ms + net.out_ms
        return (now - started) * 1e3 + unseen

    async def _relay(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        first: bytes,
        choice: Choice,
        net: Network,
        meta: dict[str, Any],
        sent: float,
        started: float,
    ) -> web.StreamResponse:
        first_at = time.perf_counter()
        ttft = (first_at - sent) * 1e3 - net.upstream_rtt_ms  # the engine's part (routing adds the network)
        self.router.latency[choice.region].observe(ttft)
        out = web.StreamResponse(status=resp.status, headers=self._headers(meta))
        out.content_type = resp.headers.get("Content-Type", "text/event-stream").split(";")[0]
        out.headers["Cache-Control"] = "no-cache"
        chunk = first
        reuse = False
        events = 0  # server-sent events relayed (one per generated chunk of tokens)
        try:
            await out.prepare(request)
            broken = False
            while chunk:
                if chunk.endswith(DONE):
                    break
                events += chunk.count(b"data: ")
                await out.write(chunk)
                try:
                    chunk = await resp.content.readany()
                except (aiohttp.ClientError, OSError):
                    broken = True
                    break
            end = time.perf_counter()
            events += 0 if broken else chunk[: -len(DONE)].count(b"data: ") if chunk.endswith(DONE) else 0
            meta |= {
                "ttft_ms": ttft,
                "decode_ms": (end - first_at) * 1e3,
                "chunks": events,
                "e2e_ms": self._e2e(net, started, end),
                "energy_j": self._joules(choice.replica, end - sent - net.upstream_rtt_ms / 1e3),
            }
            tail = b"" if broken else chunk[: -len(DONE)] if chunk.endswith(DONE) else chunk
            if broken:
                self.probe(choice.replica)
                err = {"error": {"message": f"region {choice.region} failed mid-stream", "type": "server_error",
                                 "param": None, "code": 500}}  # fmt: skip
                tail = f"data: {json.dumps(err)}\n\n".encode()
            else:
                self.observe(meta)
            await out.write(
                tail + f": edgeray {json.dumps(meta)}\n\n".encode() + (DONE if not broken else b"")
            )
            await out.write_eof()
            if not broken and chunk.endswith(DONE):  # the upstream's end of body follows its [DONE]
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(resp.content.read(), 1.0)
                    reuse = resp.content.at_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the caller hung up: closing the upstream below aborts the generation
        finally:
            # a finished stream gives its connection back to the pool: the next request to this replica
            # skips a TCP handshake (a whole round trip of the path on a --wan cluster); anything else closes
            # it, which aborts a generation still running
            if reuse:
                resp.release()
            else:
                resp.close()
        return out

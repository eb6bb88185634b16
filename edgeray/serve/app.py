"""Regional inference: vLLM's own OpenAI server in a replica per region, behind a region router.

    export EDGERAY_API_KEYS=sk-mine
    eval "$(edgeray env)"
    serve run edgeray.serve:app port=$EDGERAY_SERVE_PORT   # or: serve run serve_apps/regional.yaml
    curl -H "Authorization: Bearer sk-mine" -H "x-edgeray-region: campus" \\
         127.0.0.2:8000/v1/completions -d '{"model": "edgeray-tiny", "prompt": "The for", "max_tokens": 8}'

Two kinds of Serve deployment, and no Ray hop on the token stream:

- ``RegionReplica`` (one deployment per topology region, ``model-<region>``, pinned by the region label,
  autoscaled on its region's p95 time to first token): starts the engine and its own HTTP server on its
  node (edgeray.serve.engine_server: vLLM's OpenAI server, or the torch fallback), then registers
  ``{region, node, url, engine, accepted fields, capacity}`` in the cluster's KV store. Serve's health check
  asks the engine itself (vLLM's ``check_health``), so a replica whose engine died is replaced.
- ``RegionRouter`` (the ingress, one replica): an aiohttp server on ``host:port`` (edgeray.serve.frontdoor)
  that authenticates, validates, picks a replica by region, budget, load and health (edgeray.serve.routing)
  and relays the replica's response bytes. It reads the registrations every second, probes every replica's
  ``/health``, records the serving metrics of edgeray.monitoring.catalogue (latency histograms
  ``edgeray_serve_*_ms`` by region, tier and node, requests served or spilled, rejections by status, queue
  depth, energy per request; ``ray.util.metrics``) and publishes each region's p95 for the autoscaler.

Per tier (``tier_engines``, e.g. ``micro:onnx,device:onnx``) a region can run another engine: the onnx
engine serves an ONNX export (``onnx_model``, or the checkpoint exported once at deploy as ``onnx_quant``),
after a memory-fit check against the region's nodes, and reserves that memory in Ray. With
``cascade_threshold`` the router answers from those small tiers first and escalates the unsure answers
(edgeray.serve.frontdoor, "Cascade").

Serve's own HTTP proxy is not used (``proxy_location: Disabled`` in serve_apps/regional.yaml): HTTP goes to
the router, then straight to the engine's server. What this trades is in the README ("Regional serving").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from edgeray.monitoring.export import instrument
from edgeray.serve.config import KEYS_ENV, ServeConfig, key_hash, load_api_keys
from edgeray.serve.engine_server import unnice
from edgeray.serve.routing import Replica, Router
from edgeray.topology import NODE_LABEL, REGION_LABEL, load_topology, resolve_topology_path
from edgeray.wan import packet_level

KV_NAMESPACE = "edgeray-serve"
PROBE_EVERY_S = 1.0
FORGET_AFTER_S = 30.0
"""A registered replica that fails every probe this long is forgotten (Serve has replaced it)."""


def router_kv_key(port: int, region: str | None = None) -> str:
    """Where the router listening on ``port`` publishes its addresses (edgeray.serve.client.router_address);
    with ``region``, that region's ingress on a ``--wan`` cluster."""
    return f"router-port/{port}" if region is None else f"router-port/{port}/{region}"


def _kv() -> Any:
    from ray.experimental import internal_kv

    return internal_kv


async def kv_put(key: str, value: dict[str, Any]) -> None:
    await asyncio.to_thread(
        _kv()._internal_kv_put, key.encode(), json.dumps(value).encode(), True, namespace=KV_NAMESPACE
    )


async def kv_get(key: str) -> dict[str, Any] | None:
    raw = await asyncio.to_thread(_kv()._internal_kv_get, key.encode(), namespace=KV_NAMESPACE)
    return json.loads(raw) if raw else None


async def kv_del(key: str) -> None:
    await asyncio.to_thread(_kv()._internal_kv_del, key.encode(), namespace=KV_NAMESPACE)


async def kv_list(prefix: str) -> list[str]:
    keys = await asyncio.to_thread(_kv()._internal_kv_list, prefix.encode(), namespace=KV_NAMESPACE)
    return [k.decode() for k in keys]


# ---------------------------------------------------------------------------------------------- replica
@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=2,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=10,
)
class RegionReplica:
    """One region's engine and its HTTP server, registered for the router."""

    async def __init__(  # type: ignore[misc]
        self,
        region: str,
        model_dir: str,
        config: dict[str, Any],
        secret: str,
        app_id: str,
        engine: str | None = None,
    ) -> None:
        """Starts the engine here: the replica is registered (and routed to) only once it can generate, so no
        request's time to first token includes an engine start (vLLM: ~20 s). ``engine``: this region's
        engine (``tier_engines``), else the config's."""
        import ray

        from edgeray.placement import where
        from edgeray.serve.engine_server import EngineServer

        cfg = ServeConfig(**config)
        self.region = region
        self.target_p95_ms = cfg.scaling(region).target_p95_ms
        self.app_id = app_id
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.server = await EngineServer.start(
            model_dir,
            engine=engine or cfg.engine,
            host=ray.util.get_node_ip_address(),
            served_name=cfg.model_name,
            api_key=secret,
            max_model_len=cfg.max_model_len,
            rpc_dir=os.environ.get("RAY_TMPDIR"),
        )
        self.key = f"{app_id}/replica/{replica_id}"
        await kv_put(
            self.key,
            {
                "id": replica_id,
                "region": region,
                "node": where().get(NODE_LABEL, "?"),
                "url": self.server.url,
                "engine": self.server.engine,
                "capacity": cfg.scaling(region).capacity,
                "accepted": self.server.accepted,
                "schemas": self.server.schemas,
                "pid": self.server.pid,
            },
        )

    async def check_health(self) -> None:
        """Serve's health check: raises when the engine cannot generate (Serve then replaces the replica)."""
        await self.server.check()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """This region's p95 time to first token as the router measured it (edgeray.serve.autoscale)."""
        p95 = 0.0  # every router that sends here publishes its own; the worst counts
        for key in await kv_list(f"{self.app_id}/p95/{self.region}/"):
            stats = await kv_get(key) or {}
            p95 = max(p95, float(stats.get("p95_ttft_ms", 0.0)))
        return {"p95_ttft_ms": p95, "target_p95_ms": self.target_p95_ms}

    async def __del__(self) -> None:
        with contextlib.suppress(Exception):
            await kv_del(self.key)
        await self.server.shutdown()


# ---------------------------------------------------------------------------------------------- router
@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=5)
class RegionRouter:
    """The ingress: the HTTP front door (edgeray.serve.frontdoor) and the replica registry it routes over.

    On a ``--wan`` cluster (edgeray.wan) there is one more per region, ``router-<region>``, on a node of that
    region and listening on its cluster address: that region's callers (a client started with ``edgeray exec
    --node N``) enter there, so their requests cross the real links from their region to the replica. The
    app's own ``router`` stays on the head, beside this host's callers."""

    async def __init__(  # type: ignore[misc]
        self,
        config: dict[str, Any],
        key_hashes: list[str],
        secret: str,
        app_id: str,
        replicas: dict[str, DeploymentHandle],
        ingress_region: str | None = None,
        ingresses: dict[str, DeploymentHandle] | None = None,
    ) -> None:
        import ray

        from edgeray.placement import where
        from edgeray.serve.frontdoor import FrontDoor

        self.config = ServeConfig(**config)
        self.app_id = app_id
        self.ingress_region = ingress_region
        self.measured = packet_level()
        self.name = ingress_region or "head"
        self.node = where().get(NODE_LABEL, "head")
        self.rtt_samples: dict[str, deque[float]] = {}
        self.ingresses: dict[str, dict[str, Any]] = {}
        # bound so that Serve deploys them; traffic goes over HTTP
        self.deployments = sorted(replicas) + sorted(ingresses or {})
        topology = load_topology(resolve_topology_path(self.config.topology))
        self.router = Router(topology, prefer=self.config.prefer, energy_slack_ms=self.config.energy_slack_ms)
        self.hist = {
            name: instrument(f"edgeray_serve_{name}_ms")
            for name in ("network", "ttft", "itl", "decode", "e2e")
        }
        self.counter = instrument("edgeray_serve_requests")
        self.rejections = instrument("edgeray_serve_rejections")
        self.queue_depth = instrument("edgeray_serve_queue_depth")
        self.energy = instrument("edgeray_serve_energy_j")
        self.door = FrontDoor(
            self.config,
            self.router,
            key_hashes,
            secret,
            observe=self._observe,
            probe=self._probe_soon,
            check=self._probe,
            status=self._status,
            reject=self._reject,
            ingress_region=ingress_region,
            measured_network=self.measured,
        )
        self.failing_since: dict[str, float] = {}
        # The front door gets an event loop (uvloop where installed) and a thread of its own, at niceness 0:
        # Serve's own tasks on the replica's loops never delay a relayed chunk.
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self._run_loop, name="edgeray-router", daemon=True)
        self.thread.start()
        # a region's ingress listens on its node's cluster address, where that region's callers reach it
        host = ray.util.get_node_ip_address() if ingress_region else self.config.host
        host = host or ray.util.get_node_ip_address()
        self.addresses = await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self._start(host), self.loop)
        )
        await kv_put(
            router_kv_key(self.config.port, ingress_region),
            {"addresses": self.addresses, "node": self.node, "region": ingress_region},
        )

    def _run_loop(self) -> None:
        unnice()
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _start(self, host: str) -> list[str]:
        """On the front door's loop: its server, the probe session and the registry loop."""
        self.probes = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        self._wake = asyncio.Event()
        addresses = await self.door.start(host)
        self._task = asyncio.create_task(self._maintain())
        return addresses

    def _observe(self, meta: dict[str, Any]) -> None:
        region = meta["region"]
        tier = self.router.topology.regions[region].tier.value
        tags = {"region": region, "tier": tier, "node": str(meta.get("node", ""))}
        self.hist["network"].observe(float(meta["network_in_ms"] + meta["network_out_ms"]), tags=tags)
        self.hist["ttft"].observe(float(meta["ttft_ms"]), tags=tags)
        if "decode_ms" in meta:
            self.hist["decode"].observe(float(meta["decode_ms"]), tags=tags)
            if meta.get("chunks", 0) > 1:
                self.hist["itl"].observe(float(meta["decode_ms"]) / (meta["chunks"] - 1), tags=tags)
        self.hist["e2e"].observe(float(meta["e2e_ms"]), tags=tags)
        if "energy_j" in meta:
            self.energy.observe(float(meta["energy_j"]), tags={"region": region, "tier": tier})
        outcome = "spilled" if meta["spilled"] else "served"
        self.counter.inc(tags={"region": region, "tier": tier, "outcome": outcome})
        self._queue_depth()

    def _reject(self, status: int, code: str) -> None:
        self.rejections.inc(tags={"status": str(status), "code": code})

    def _queue_depth(self) -> None:
        """Requests in flight per region (the router's own count), one gauge per region it serves."""
        depth: dict[str, int] = {}
        for r in self.router.replicas.values():
            depth[r.region] = depth.get(r.region, 0) + r.inflight
        for region, n in depth.items():
            tier = (
                self.router.topology.regions[region].tier.value
                if region in self.router.topology.regions
                else ""
            )
            self.queue_depth.set(float(n), tags={"region": region, "tier": tier})

    def _probe_soon(self, _: Replica) -> None:
        self._wake.set()

    async def _maintain(self) -> None:
        """Every second (or at once after a failure): registrations, health probes, p95 for the autoscaler."""
        while True:
            try:
                await self._refresh()
            except Exception as exc:  # a GCS hiccup must not stop the loop; it is retried next round
                print(f"edgeray router: registry refresh failed ({type(exc).__name__}: {exc}); retrying")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PROBE_EVERY_S)

    async def _refresh(self) -> None:
        keys = await kv_list(f"{self.app_id}/replica/")
        known = self.router.replicas
        for key in keys:
            rid = key.rsplit("/", 1)[1]
            if rid not in known and (info := await kv_get(key)):
                known[rid] = Replica(
                    id=rid,
                    region=info["region"],
                    node=info["node"],
                    url=info["url"],
                    engine=info["engine"],
                    capacity=int(info["capacity"]),
                    accepted=info["accepted"],
                    schemas=info.get("schemas", {}),
                    pid=int(info.get("pid", 0)),
                    healthy=False,  # until its first probe answers
                )
        for rid in set(known) - {k.rsplit("/", 1)[1] for k in keys}:
            del known[rid]  # deregistered (scaled down or shut down)
        replicas = list(known.values())
        self._queue_depth()
        results = await asyncio.gather(*(self._probe(r) for r in replicas))
        now = time.monotonic()
        for replica, ok in zip(replicas, results, strict=True):
            replica.healthy = ok
            if ok:
                self.failing_since.pop(replica.id, None)
                replica.failed_until = 0.0
            elif now - self.failing_since.setdefault(replica.id, now) > FORGET_AFTER_S:
                await kv_del(f"{self.app_id}/replica/{replica.id}")
                del known[replica.id]
                self.failing_since.pop(replica.id, None)
        for region, lat in self.router.latency.items():
            p95 = lat.p95(now, 30.0)
            if p95 is not None:
                await kv_put(f"{self.app_id}/p95/{region}/{self.name}", {"p95_ttft_ms": p95})
        if self.measured:
            await asyncio.gather(*(self._measure_path(r) for r in replicas if r.healthy))
            prefix = router_kv_key(self.config.port, "")  # every region's ingress, for GET /edgeray/status
            self.ingresses = {
                k[len(prefix) :]: info for k in await kv_list(prefix) if (info := await kv_get(k))
            }

    async def _measure_path(self, replica: Replica) -> None:
        """The round trip of the path to ``replica`` as the kernel measured a TCP handshake to its engine
        server (no application on the path); the median of the last five is the path's (``Replica.rtt_ms``)."""
        from urllib.parse import urlsplit

        from edgeray.serve.frontdoor import tcp_rtt_ms

        url = urlsplit(replica.url)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(url.hostname, url.port), 2)
        except (OSError, asyncio.TimeoutError, TimeoutError):
            return  # the health probe decides what that means
        rtt = tcp_rtt_ms(writer.get_extra_info("socket"))
        writer.close()
        if rtt is not None:
            samples = self.rtt_samples.setdefault(replica.id, deque(maxlen=5))
            samples.append(rtt)
            replica.rtt_ms = sorted(samples)[len(samples) // 2]

    async def _probe(self, replica: Replica) -> bool:
        try:
            async with self.probes.get(replica.url + "/health") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):  # refused, reset, timed out: not healthy
            return False
        except Exception as exc:  # anything else is a bug here, not a sick engine: say so, and keep routing
            print(f"edgeray router: probing {replica.url} raised {type(exc).__name__}: {exc}")
            return False

    async def check_health(self) -> None:
        if not self.thread.is_alive() or self._task.done():
            raise RuntimeError("the router's event loop or registry loop stopped")

    def _status(self) -> dict[str, Any]:
        now = time.monotonic()
        r = self.router
        return {
            "addresses": self.addresses,
            "ingress_region": self.ingress_region,
            "node": self.node,
            "network": "measured" if self.measured else "modelled",
            "ingresses": {region: info["addresses"][0] for region, info in sorted(self.ingresses.items())},
            "ttft_ms": {  # what routing currently expects per region (median of the window) and its p95
                region: {
                    "median": lat.estimate(now, r.window_s, r.ttft_guess_ms),
                    "p95": lat.p95(now, r.window_s),
                }
                for region, lat in r.latency.items()
            },
            "replicas": [
                {
                    "id": r.id,
                    "region": r.region,
                    "node": r.node,
                    "engine": r.engine,
                    "pid": r.pid,
                    "healthy": r.healthy,
                    "inflight": r.inflight,
                    "rtt_ms": r.rtt_ms,
                }
                for r in self.router.replicas.values()
            ],
        }

    async def status(self) -> dict[str, Any]:
        """Where the router listens and what it knows of each replica (also ``GET /edgeray/status``)."""
        return self._status()

    async def __call__(self, request: Any) -> Any:
        """Through Serve's own proxy (if one runs): point the caller at the router's address."""
        from starlette.responses import JSONResponse

        message = f"edgeray serves HTTP directly at {self.addresses[0]}; send requests there"
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": 421}}
        return JSONResponse(body, status_code=421)

    async def _close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(Exception):
            await self.door.close()
            await self.probes.close()

    async def __del__(self) -> None:
        with contextlib.suppress(Exception):
            await kv_del(router_kv_key(self.config.port, self.ingress_region))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._close(), self.loop)), 10
            )
        self.loop.call_soon_threadsafe(self.loop.stop)


# ---------------------------------------------------------------------------------------------- builder
def _serve_without_proxy() -> None:
    """Under ``serve run edgeray.serve:app`` (this builder runs in the CLI's process before it connects):
    connect to ``RAY_ADDRESS`` and start Serve with its HTTP proxy disabled, as serve_apps/regional.yaml
    does; the CLI then joins that Serve instance. Otherwise it would start a proxy on every node, and on a
    local cluster, whose raylets share one address, those proxies fight over one port. Where Ray is already
    connected (the config form builds on the cluster; Python callers start Serve themselves), nothing."""
    import ray

    if ray.is_initialized() or not os.environ.get("RAY_ADDRESS"):
        return
    from ray.serve._private.constants import SERVE_NAMESPACE

    ray.init(address=os.environ["RAY_ADDRESS"], namespace=SERVE_NAMESPACE, logging_level=logging.ERROR)
    serve.start(proxy_location="Disabled")


def _device_tier(
    config: ServeConfig, topology: Any, engines: dict[str, str], model_dir: str
) -> tuple[str | None, int]:
    """For regions that run the onnx engine: the export they serve (``onnx_model``, or ``model`` exported
    once at deploy as ``onnx_quant`` under $EDGERAY_HOME/exports) and the memory one replica needs, checked
    against every such region's nodes before anything is placed."""
    onnx_regions = sorted(r for r, e in engines.items() if e == "onnx")
    if not onnx_regions:
        return None, 0
    from edgeray.model.export_onnx import ExportError, load_info
    from edgeray.serve.onnx_engine import is_export, memory_need, onnx_available

    if not onnx_available():
        raise ValueError(f"regions {onnx_regions} run the onnx engine but onnxruntime is not importable")
    if config.onnx_model:
        onnx_dir = str(Path(config.onnx_model).expanduser().resolve())
        if not is_export(onnx_dir):
            raise ValueError(
                f"onnx_model {onnx_dir}: not an ONNX export; write one with `edgeray export onnx`"
            )
    else:
        try:
            onnx_dir = str(deploy_export(model_dir, config.onnx_quant))
        except ExportError as exc:
            raise ValueError(f"model {model_dir}: cannot export it for the onnx engine: {exc}") from None
    need = memory_need(load_info(onnx_dir), config.max_model_len)
    for name in onnx_regions:
        region = topology.regions[name]
        best = max(region.nodes, key=lambda n: n.memory_gb)
        if best.memory_gb * 2**30 < need.total:
            raise ValueError(
                f"region {name!r} ({region.tier.value}) cannot hold the onnx engine: one replica needs "
                f"{need.describe()} and its largest node, {best.name}, has memory_gb {best.memory_gb:g} "
                f"({best.memory_gb * 1024:.0f} MiB). Use a smaller format (onnx_quant=int4), a shorter "
                "max_model_len, or another engine for this tier (tier_engines)"
            )
    return onnx_dir, need.total


def deploy_export(model_dir: str, quant: str) -> Path:
    """``model_dir`` exported as ``quant`` under $EDGERAY_HOME/exports, once per checkpoint content and
    format (keyed by the checkpoint's path and its files' sizes and mtimes); concurrent callers wait for
    the one exporting."""
    import fcntl
    import hashlib

    from edgeray.cluster import edgeray_home
    from edgeray.model.export_onnx import export_onnx
    from edgeray.serve.onnx_engine import is_export

    files = sorted(Path(model_dir).iterdir())
    stamp = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file())
    digest = hashlib.sha256(f"{Path(model_dir).resolve()}|{stamp}".encode()).hexdigest()[:16]
    root = edgeray_home() / "exports"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{Path(model_dir).name}-{digest}-{quant}"
    with (root / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_export(out):
            export_onnx(model_dir, out, quant=quant)
    return out


def app(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve application builder (``serve run edgeray.serve:app key=value ...`` / serve_apps/regional.yaml)."""
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
            f"auth is 'required' but no API keys reached the app: `serve run edgeray.serve:app` reads "
            f"{KEYS_ENV} from your shell; `serve run <config.yaml>` builds the app on the cluster, which sees "
            f"{KEYS_ENV} only if it was exported before `edgeray up`; or set api_keys_file; or auth=open "
            "for a local demo"
        )
    model_dir = str(Path(config.model).expanduser().resolve()) if config.model else str(bundled_model())
    if not (Path(model_dir) / "config.json").exists():
        raise ValueError(f"model {model_dir}: not a Hugging Face checkpoint directory (no config.json)")
    engines = {name: config.engine_for(r.tier.value) for name, r in topology.regions.items()}
    onnx_dir, onnx_memory = _device_tier(config, topology, engines, model_dir)
    secret = secrets.token_urlsafe(24)  # the router's key to the engines' servers; clients never see it
    app_id = uuid.uuid4().hex[:12]
    raw = config.model_dump()
    replicas = {}
    for region in topology.regions:
        scaling = config.scaling(region)
        options: dict[str, Any] = {"num_cpus": 0, "label_selector": {REGION_LABEL: region}}
        if engines[region] == "onnx":
            options["memory"] = onnx_memory  # Ray places it only on a node of the region that has room
        replicas[region] = RegionReplica.options(  # type: ignore[attr-defined]
            name=f"model-{region}",
            ray_actor_options=options,
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
        ).bind(
            region, onnx_dir if engines[region] == "onnx" else model_dir, raw, secret, app_id, engines[region]
        )
    hashes = sorted(key_hash(k) for k in keys)
    _serve_without_proxy()
    router_options: dict[str, Any] = {"name": "router"}
    ingresses: dict[str, Any] = {}
    if packet_level():
        # On a --wan cluster (edgeray.wan) the router runs on the head, in the root namespace beside this
        # host's callers: `curl localhost:PORT` works as on any cluster, and each request pays the route
        # from the head's region to the replica it is sent to. Each region gets an ingress of its own on
        # one of its nodes, where its callers enter.
        router_options["ray_actor_options"] = {"num_cpus": 0, "label_selector": {"edgeray.io/role": "head"}}
        for region in topology.regions:
            ingresses[region] = RegionRouter.options(  # type: ignore[attr-defined]
                name=f"router-{region}",
                ray_actor_options={"num_cpus": 0, "label_selector": {REGION_LABEL: region}},
            ).bind(raw, hashes, secret, app_id, replicas, region)
    return RegionRouter.options(**router_options).bind(  # type: ignore[attr-defined]
        raw, hashes, secret, app_id, replicas, None, ingresses
    )

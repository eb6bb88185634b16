"""edgeray's OpenAI surface for its own engines: torch (replicas where vLLM cannot be imported) and onnx
(device- and micro-tier replicas).

The same endpoints and error bodies as vLLM's server (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, SSE streaming with ``stream_options.include_usage``, ``/health``, token
``logprobs`` as OpenAI shapes them), for the parameters these engines honour: ``ACCEPTED``. The region router refuses every other body field with
400 naming it, so nothing a caller sets is silently dropped. Tokenization runs off the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeray.serve.engines import BatchingEngine, EngineError, TokenLogprob, TorchEngine
from edgeray.serve.engines import Request as EngineRequest

_COMMON = [
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stream",
    "stream_options",
    "stop",
    "n",
    "user",
]
ACCEPTED: dict[str, list[str]] = {
    "completions": sorted([*_COMMON, "prompt", "logprobs"]),
    "chat": sorted([*_COMMON, "messages", "max_completion_tokens", "logprobs", "top_logprobs"]),
}
MAX_LOGPROBS = 5
"""The most alternatives per position ``logprobs`` / ``top_logprobs`` may ask for (OpenAI's completions limit)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1, description="the torch engine generates one choice")
    user: str | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


PROMPT_FORMS = (
    "must be one non-empty string, a non-empty list of token ids (>= 0), or a list holding one of those"
)
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]


class CompletionBody(_Sampling):
    prompt: (
        Text
        | TokenIds
        | Annotated[list[Text], Field(min_length=1, max_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    ) = Field(
        description="one prompt: text, token ids, or a list holding one of those (these engines take one "
        "prompt per request)"
    )
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def top_n(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def top_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def error(
    status: int, message: str, param: str | None = None, type_: str = "BadRequestError"
) -> JSONResponse:
    """An error body shaped like vLLM's (and OpenAI's): never exception text or a traceback."""
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": status}}, status_code=status
    )


def build_torch_app(engine: BatchingEngine, *, served_name: str, api_key: str) -> FastAPI:
    """The FastAPI app a torch or onnx replica serves; every route but ``/health`` needs ``api_key``."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    tok = engine.tokenizer

    def authorised(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        return hmac.compare_digest(header.encode(), f"Bearer {api_key}".encode())

    async def parse(request: Request, model: type[_Sampling]) -> _Sampling | JSONResponse:
        if not authorised(request):
            return error(401, "Unauthorized", type_="AuthenticationError")
        try:
            data = json.loads(await request.body())
            body = model.model_validate(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return error(400, "request body is not valid JSON")
        except ValidationError as exc:
            err = exc.errors()[0]
            if err["loc"][:1] == ("prompt",):  # one error per union branch: say what a prompt may be
                return error(400, f"prompt: {PROMPT_FORMS}", "prompt")
            param = ".".join(str(p) for p in err["loc"]) or None
            return error(400, f"{param}: {err['msg']}" if param else err["msg"], param)
        if body.model != served_name:
            return error(404, f"The model `{body.model}` does not exist.", "model", "NotFoundError")
        if isinstance(body, ChatBody) and body.top_logprobs is not None and not body.logprobs:
            return error(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
        return body

    def prompt_ids(body: CompletionBody) -> list[int] | JSONResponse:
        p: Any = body.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
            p = p[0]
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            ids = [int(x) for x in p]
            if max(ids) >= len(tok) or min(ids) < 0:
                return error(400, f"prompt: token ids must be in [0, {len(tok)})", "prompt")
            return ids
        if isinstance(p, str) and p:
            return tok(p)["input_ids"]
        if isinstance(p, list) and len(p) > 1:
            return error(400, "prompt: the torch engine takes one prompt per request", "prompt")
        return error(400, "prompt: must be a non-empty string or list of token ids", "prompt")

    async def generate(kind: str, body: _Sampling, ids: list[int]) -> Response:
        max_tokens = (
            getattr(body, "max_completion_tokens", None) or body.max_tokens or engine.max_model_len - len(ids)
        )
        if len(ids) + max_tokens > engine.max_model_len:
            return error(
                400,
                f"This model's maximum context length is {engine.max_model_len} tokens. However, you "
                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the "
                "completion).",
                "max_tokens",
            )
        top_n = body.top_n()  # type: ignore[attr-defined]
        req = EngineRequest(ids, max_tokens, body.temperature, body.top_p, body.seed, logprobs=top_n)
        rid = f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
        stream = _stop_at(engine.stream(req), body.stops())
        usage = {"prompt_tokens": len(ids)}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse(
                kind, rid, served_name, stream, usage, include_usage, tok if top_n is not None else None
            )
            return StreamingResponse(events, media_type="text/event-stream")
        text, n, finish = "", 0, None
        lps: list[TokenLogprob] = []
        async for piece, tokens, reason, piece_lps in stream:
            text += piece
            n += tokens
            finish = reason
            lps += piece_lps
        usage |= {"completion_tokens": n, "total_tokens": len(ids) + n}
        shaped = None if top_n is None else _logprobs(kind, lps, tok)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": shaped}
        if kind == "completions":
            choice["text"] = text
        else:
            choice["message"] = {"role": "assistant", "content": text}
        obj = "text_completion" if kind == "completions" else "chat.completion"
        return JSONResponse(
            {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": served_name,
                "choices": [choice],
                "usage": usage,
            }
        )

    @app.get("/health")
    async def health() -> Response:
        try:
            engine.check()
        except EngineError:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not authorised(request):
            return error(401, "Unauthorized", type_="AuthenticationError")
        card = {"id": served_name, "object": "model", "created": 0, "owned_by": "edgeray",
                "max_model_len": engine.max_model_len}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse(request, CompletionBody)
        if isinstance(body, Response):
            return body
        ids = await asyncio.to_thread(prompt_ids, body)  # type: ignore[arg-type]
        if isinstance(ids, Response):
            return ids
        return await generate("completions", body, ids)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await parse(request, ChatBody)
        if isinstance(body, Response):
            return body
        messages = [m.model_dump(exclude_none=True) for m in body.messages]  # type: ignore[attr-defined]

        def encode() -> list[int]:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]

        return await generate("chat", body, await asyncio.to_thread(encode))

    return app


async def _stop_at(
    deltas: AsyncIterator[Any], stops: list[str]
) -> AsyncIterator[tuple[str, int, str | None, list[TokenLogprob]]]:
    """(text, tokens, finish_reason, token logprobs) pieces, cut at the first stop string (held back until it
    cannot be one). A token the stop string cuts into still counts, as in vLLM's usage."""
    held, tokens = "", 0
    lps: list[TokenLogprob] = []
    async for d in deltas:
        held += d.text
        tokens += len(d.token_ids)
        lps += d.logprobs or []
        hits = [(held.find(s), s) for s in stops if s and s in held]
        if hits:
            at, _ = min(hits)
            yield held[:at], tokens, "stop", lps
            await deltas.aclose()  # type: ignore[attr-defined]
            return
        if d.finish_reason is not None:
            yield held, tokens, d.finish_reason, lps
            return
        keep = max((len(s) - 1 for s in stops if s), default=0)  # a stop string may straddle deltas
        cut = len(held) - keep
        if cut > 0:
            yield held[:cut], tokens, None, lps
            held, tokens, lps = held[cut:], 0, []


def _logprobs(kind: str, lps: list[TokenLogprob], tok: Any, offset: int = 0) -> dict[str, Any]:
    """Token log-probabilities in OpenAI's shape: completions' ``tokens`` / ``token_logprobs`` /
    ``top_logprobs`` / ``text_offset`` (from ``offset``, the text streamed before), or chat's ``content``."""
    text = [tok.decode([lp.token_id]) for lp in lps]
    if kind == "completions":
        offsets, at = [], offset
        for piece in text:
            offsets.append(at)
            at += len(piece)
        return {
            "tokens": text,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{tok.decode([i]): v for i, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        piece = tok.decode([token_id])
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    return {
        "content": [
            entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(i, v) for i, v in lp.top]} for lp in lps
        ]
    }


async def _sse(
    kind: str,
    rid: str,
    model: str,
    pieces: AsyncIterator[tuple[str, int, str | None, list[TokenLogprob]]],
    usage: dict[str, int],
    include_usage: bool,
    logprob_tokenizer: Any = None,
) -> AsyncIterator[str]:
    """Server-sent events; with ``logprob_tokenizer``, each chunk carries its tokens' log-probabilities."""
    obj = "text_completion" if kind == "completions" else "chat.completion.chunk"
    created, n, first, offset = int(time.time()), 0, True, 0
    async for text, tokens, finish, lps in pieces:
        n += tokens
        shaped = None
        if logprob_tokenizer is not None:
            shaped = _logprobs(kind, lps, logprob_tokenizer, offset)
            offset += sum(len(t) for t in shaped.get("tokens", []))
        if kind == "completions":
            choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": shaped, "finish_reason": finish}
        else:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "logprobs": shaped, "finish_reason": finish}
        first = False
        chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        yield f"data: {json.dumps(chunk)}\n\n"
    if include_usage:
        full = {**usage, "completion_tokens": n, "total_tokens": usage["prompt_tokens"] + n}
        chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": full}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m edgeray.serve.torch_api --model DIR --port N [--engine torch|onnx]``: the engine's server
    (the key comes from ``VLLM_API_KEY``, as for vLLM's server)."""
    import argparse
    import os

    import uvicorn

    parser = argparse.ArgumentParser(description="edgeray torch / onnx engine, OpenAI API")
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", default="edgeray-tiny")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--engine", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the engine")
    args = parser.parse_args(argv)
    key = os.environ.get("VLLM_API_KEY", "")
    if not key:
        parser.error("set VLLM_API_KEY: the server refuses to run without a key")

    async def serve() -> None:
        engine: BatchingEngine
        if args.engine == "onnx":
            from edgeray.serve.onnx_engine import OnnxEngine

            engine = OnnxEngine(args.model, max_model_len=args.max_model_len, threads=args.threads)
        else:
            engine = TorchEngine(args.model, max_model_len=args.max_model_len, threads=args.threads)
        await engine.start()
        app = build_torch_app(engine, served_name=args.served_model_name, api_key=key)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
        await uvicorn.Server(config).serve()
        await engine.shutdown()

    asyncio.run(serve())


if __name__ == "__main__":
    main()

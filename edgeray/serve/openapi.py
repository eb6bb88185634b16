"""The regional serving app's OpenAPI description, built from what its engines accept.

Each engine server describes its request bodies as JSON Schemas (``engine_schemas``): edgeray's own
engines from their pydantic models (edgeray.serve.torch_api), vLLM from its server's ``/openapi.json``
(``vllm_schemas``). The region router serves ``GET /openapi.json`` (to key holders, like everything but ``/health``) built by
``document``: for each endpoint, the body fields every registered engine honours (the router refuses the
others with 400), ``model`` fixed to the served name, ``max_tokens`` capped at the app's limit, the routing
headers, and every answer the router gives, errors included, in OpenAI's error shape. Clients and API
fuzzers (schemathesis) read it; the description is what the router enforces, not a wish.
"""

from __future__ import annotations

import copy
from typing import Any

SCHEMA_NAMES = {"completions": "CompletionRequest", "chat": "ChatCompletionRequest"}
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
REF = "#/components/schemas/"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}
"""The body of every error answer, the router's and the engines' alike (OpenAI's shape)."""

SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}},
    "description": "one server-sent event: a JSON chunk, or [DONE] last",
}

ERRORS = {
    "400": "a malformed body, a field no engine here honours, a value out of range, a prompt over the context",
    "401": "no or a wrong API key",
    "404": "an unknown path or model",
    "405": "a method the path does not take",
    "413": "a body over max_body_bytes",
    "429": "no region can answer within the budget right now (Retry-After)",
    "503": "no healthy region (Retry-After)",
}


def engine_schemas(models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{endpoint: {"schema": ..., "components": {...}}}`` from pydantic request models."""
    out: dict[str, dict[str, Any]] = {}
    for endpoint, model in models.items():
        schema = model.model_json_schema(ref_template=REF + "{model}")
        components = schema.pop("$defs", {})
        out[endpoint] = {"schema": schema, "components": components}
    return out


def vllm_schemas(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The completions and chat request schemas of vLLM's own OpenAPI document, with every component they
    reference (transitively)."""
    components = doc.get("components", {}).get("schemas", {})
    out: dict[str, dict[str, Any]] = {}
    for endpoint, name in SCHEMA_NAMES.items():
        if name not in components:
            continue
        needed: dict[str, Any] = {}
        todo = list(_refs(components[name]))
        while todo:
            ref = todo.pop()
            if ref not in needed and ref in components:
                needed[ref] = components[ref]
                todo.extend(_refs(components[ref]))
        out[endpoint] = {"schema": copy.deepcopy(components[name]), "components": copy.deepcopy(needed)}
    return out


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    stack = [node]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            ref = v.get("$ref")
            if isinstance(ref, str) and ref.startswith(REF):
                found.add(ref[len(REF) :])
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return found


def accepted(schemas: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The body fields per endpoint that an engine's schemas allow."""
    return {ep: sorted(s["schema"].get("properties", {})) for ep, s in schemas.items()}


def _cap(schema: dict[str, Any], limit: int) -> dict[str, Any]:
    """``schema`` with every integer branch's maximum lowered to ``limit``."""
    schema = copy.deepcopy(schema)
    branches = schema.get("anyOf") or schema.get("oneOf") or [schema]
    for b in branches:
        if b.get("type") == "integer":
            b["maximum"] = min(int(b.get("maximum", limit)), limit)
    return schema


def _body_schema(
    endpoint: str, engines: list[dict[str, dict[str, Any]]], model_name: str, max_tokens: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The router's body schema for ``endpoint``: the first engine's schema restricted to the fields every
    engine accepts (the router refuses the rest), and the components it needs."""
    first = engines[0][endpoint]
    fields = set.intersection(*(set(e[endpoint]["schema"].get("properties", {})) for e in engines))
    schema = copy.deepcopy(first["schema"])
    props = {k: v for k, v in schema.get("properties", {}).items() if k in fields}
    props["model"] = {"type": "string", "enum": [model_name], "description": "the served model"}
    for name in ("max_tokens", "max_completion_tokens"):
        if name in props:
            props[name] = _cap(props[name], max_tokens)
    schema["properties"] = props
    # vLLM's schema leaves the prompt optional (prompt_embeds may stand in), but its server, as edgeray
    # starts it (no --enable-prompt-embeds), refuses a body without one: the description says so
    needed = {"model", "prompt" if endpoint == "completions" else "messages"}
    schema["required"] = sorted((set(schema.get("required", [])) | needed) & set(props))
    schema["additionalProperties"] = False
    schema.pop("title", None)
    return schema, copy.deepcopy(first["components"])


def _answers(ok: dict[str, Any]) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": REF + "Error"}}}
    return {"200": ok} | {code: {"description": why, "content": error} for code, why in ERRORS.items()}


def document(
    *,
    engines: list[dict[str, dict[str, Any]]],
    model_name: str,
    max_model_len: int,
    max_tokens_limit: int,
    regions: list[str],
    version: str,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the router in front of engines whose schemas are ``engines``."""
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "summary": "liveness of the router (no key)",
                "security": [],
                "responses": {"200": _json({"type": "object", "required": ["status"]}, "alive")},
            }
        },
        "/v1/models": {
            "get": {
                "summary": "the served model",
                "responses": _answers(_json({"type": "object", "required": ["object", "data"]}, "models")),
            }
        },
        "/edgeray/status": {
            "get": {
                "summary": "the replicas the router routes to",
                "responses": _answers(_json({"type": "object"}, "replicas")),
            }
        },
    }
    headers = [
        {
            "name": "x-edgeray-region",
            "in": "header",
            "required": False,
            "description": f"the caller's region; unknown or absent: the default region (one of {regions})",
            "schema": {"type": "string"},
        },
        {
            "name": "x-edgeray-budget-ms",
            "in": "header",
            "required": False,
            "description": "the latency budget in ms (a positive number); absent: the app's budget_ms",
            "schema": {"type": "number", "exclusiveMinimum": 0},
        },
    ]
    answer = {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {"model": {"type": "string"}, "choices": {"type": "array"}},
    }
    ok = {
        "description": "the answer (application/json), or its token stream (text/event-stream) when stream",
        "content": {"application/json": {"schema": answer}, "text/event-stream": {"schema": SSE_EVENT}},
    }
    for endpoint, path in PATHS.items():
        if not engines or any(endpoint not in e for e in engines):
            continue
        schema, needed = _body_schema(endpoint, engines, model_name, max_tokens_limit)
        name = SCHEMA_NAMES[endpoint]
        components |= needed
        components[name] = schema
        paths[path] = {
            "post": {
                "summary": f"{endpoint} (OpenAI-compatible), routed to the nearest region within the budget",
                "parameters": headers,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF + name}}},
                },
                "responses": _answers(ok),
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edgeray regional serving",
            "version": version,
            "description": f"OpenAI-compatible serving of {model_name} (context {max_model_len} tokens) "
            f"across regions {regions}; every error is an OpenAI error body.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _json(schema: dict[str, Any], what: str) -> dict[str, Any]:
    return {"description": what, "content": {"application/json": {"schema": schema}}}

"""Helpers for callers of the regional app: its router's address, waiting until every region serves, a
streamed completion with its latency breakdown.

base = router_address(app_name="regional")             # inside a Ray driver
wait_until_serving(base, key, ["campus", "metro"], timeout_s=300)
"""

from __future__ import annotations

import json
import time
from typing import Any

from edgeray.serve.app import KV_NAMESPACE, _kv


def router_address(port: int, timeout_s: float = 120.0, region: str | None = None) -> str:
    """The first address of the app router listening on ``port`` (``http://host:port``), as it published it
    in the cluster's KV store once listening; waits (bounded) while it starts. ``region``: that region's own
    ingress (a ``--wan`` cluster only). Needs a Ray driver."""
    return str(router_info(port, timeout_s, region)["addresses"][0])


def router_info(port: int, timeout_s: float = 120.0, region: str | None = None) -> dict[str, Any]:
    """What the router on ``port`` (``region``: that region's ingress) published: ``addresses``, ``node``."""
    from edgeray.serve.app import router_kv_key

    kv = _kv()
    deadline = time.monotonic() + timeout_s
    what = f"region {region}'s ingress" if region else "edgeray router"
    while True:
        raw = kv._internal_kv_get(router_kv_key(port, region).encode(), namespace=KV_NAMESPACE)
        if raw:
            return dict(json.loads(raw))
        if time.monotonic() > deadline:
            hint = " (regional ingresses run on --wan clusters only)" if region else ""
            raise TimeoutError(f"no {what} listens on port {port} after {timeout_s:.0f} s{hint}")
        time.sleep(0.5)


def wait_until_serving(
    base: str, key: str, regions: list[str], timeout_s: float = 300.0, model: str = "edgeray-tiny"
) -> None:
    """Poll (bounded) until a request from each region is answered and the region serves: the answer came
    from it, or the router lists a healthy replica of it (a cascade's small tiers answer every caller
    first; a region whose own link is slower than a neighbour's, like a cell of phones next to its site,
    sends its callers there). Engines start in ~20 s each and the bundled model may be built first. Raises
    ``TimeoutError`` naming the region that did not."""
    import requests

    def healthy(region: str) -> bool:
        status = requests.get(
            f"{base}/edgeray/status", headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        replicas = status.json().get("replicas", []) if status.status_code == 200 else []
        return any(r["region"] == region and r["healthy"] for r in replicas)

    deadline = time.monotonic() + timeout_s
    for region in regions:
        while True:
            try:
                r = requests.post(
                    f"{base}/v1/completions",
                    headers={
                        "Authorization": f"Bearer {key}",
                        "x-edgeray-region": region,
                        "x-edgeray-budget-ms": "60000",
                    },
                    json={"model": model, "prompt": "hi", "max_tokens": 1},
                    timeout=120,
                )
                if r.status_code == 200 and (r.headers.get("x-edgeray-region") == region or healthy(region)):
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"region {region} did not serve at {base} within {timeout_s:.0f} s")
            time.sleep(1)


def stream_completion(
    base: str,
    key: str,
    prompt: str,
    *,
    region: str,
    max_tokens: int = 12,
    budget_ms: float | None = None,
    model: str = "edgeray-tiny",
    timeout_s: float = 120.0,
) -> tuple[int, str, dict[str, Any]]:
    """One streamed completion asked from ``region``: (HTTP status, text, breakdown). The breakdown is the
    router's ``x-edgeray-*`` headers merged with the ``: edgeray {...}`` comment that ends the stream
    (``ttft_ms``, ``decode_ms``, ``e2e_ms``); on an error status, the text is the error message."""
    import requests

    headers = {"Authorization": f"Bearer {key}", "x-edgeray-region": region}
    if budget_ms is not None:
        headers["x-edgeray-budget-ms"] = str(budget_ms)
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
    }
    with requests.post(
        f"{base}/v1/completions", headers=headers, json=body, stream=True, timeout=timeout_s
    ) as reply:
        if reply.status_code != 200:
            return reply.status_code, reply.json()["error"]["message"], {}
        text, breakdown = "", {}
        for raw in reply.iter_lines():
            line = raw.decode()
            if line.startswith(": edgeray "):
                breakdown = json.loads(line[len(": edgeray ") :])
            elif line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                text += "".join(c.get("text", "") for c in event.get("choices", []))
        return reply.status_code, text, breakdown

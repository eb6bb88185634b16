"""Helpers for callers of the regional app: wait until every region serves, and the app's router address.

base = router_address(app_name="regional")             # inside a Ray driver
wait_until_serving(base, key, ["campus", "metro"], timeout_s=300)
"""

from __future__ import annotations

import time


def router_address(app_name: str = "regional", timeout_s: float = 60.0) -> str:
    """The first address the app's router listens on (``http://host:port``); needs a Ray driver."""
    from ray import serve

    handle = serve.get_deployment_handle("router", app_name=app_name)
    status = handle.status.remote().result(timeout_s=timeout_s)
    return str(status["addresses"][0])


def wait_until_serving(
    base: str, key: str, regions: list[str], timeout_s: float = 300.0, model: str = "edgeray-tiny"
) -> None:
    """Poll (bounded) until a request from each region is served in that region; engines start in ~20 s
    each and the bundled model may be built first. Raises ``TimeoutError`` naming the region that did not."""
    import requests

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
                if r.status_code == 200 and r.headers.get("x-edgeray-region") == region:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"region {region} did not serve at {base} within {timeout_s:.0f} s")
            time.sleep(1)

"""Serving on the edge fleet: Ray Serve applications whose replicas are pinned to topology regions.

    serve run edgeray.serve:app            # the regional OpenAI-compatible app (edgeray.serve.app)

app.py          the Serve deployments (a replica per region, the region router) and the app builder
config.py       the app's typed configuration and API keys
engine_server.py, supervise.py   the engine's own HTTP server (vLLM's, or torch_api.py) a replica runs
engines.py      the torch engine (iteration-level batching), the fallback where vLLM cannot be imported
routing.py      region choice: own region, nearest, cloud; health, capacity, first-token budget
frontdoor.py    the router's HTTP server: keys, limits, validation, byte relay, failover
client.py       helpers for callers: router address, waiting until every region serves, a streamed request
autoscale.py    the p95 time-to-first-token autoscaling policy
regions.py      the small region-pinned placement demo app (serve_apps/regions.yaml)
"""

from edgeray.serve.app import app

__all__ = ["app"]

"""One Serve replica per region behind an HTTP ingress that says where each request was served.

    eval "$(edgeray env)"
    serve run serve_apps/regions.yaml --non-blocking
    curl '127.0.0.2:8000/?region=metro&text=hi'      # served by a replica on a metro node
    curl '127.0.0.2:8000/?near=campus-gw'            # served in the region nearest to campus-gw

Each region's deployment carries ``label_selector={"edgeray.io/region": <region>}``, so Ray places its
replica on that region's nodes. The ingress answers 400 with the valid choices for an unknown region or
node, and picks the nearest region by the topology's path latency for ``near=``.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from edgeray.placement import where
from edgeray.topology import REGION_LABEL, Topology, TopologyError, load_topology, resolve_topology_path


@serve.deployment(ray_actor_options={"num_cpus": 0})
class RegionReplica:
    """Answers from inside its region; a stand-in for the regional model replicas of the serving work."""

    def __init__(self, region: str) -> None:
        self.region = region

    def __call__(self, text: str) -> dict[str, Any]:
        return {"region": self.region, "labels": where(), "echo": text}


@serve.deployment(ray_actor_options={"num_cpus": 0})
class RegionIngress:
    """HTTP entry: ``?region=R`` or ``?near=NODE_OR_REGION``, plus ``text=...``."""

    def __init__(self, topology_path: str, replicas: dict[str, DeploymentHandle]) -> None:
        self.topology: Topology = load_topology(topology_path)
        self.replicas = replicas

    async def __call__(self, request: Request) -> JSONResponse:
        params = request.query_params
        text = params.get("text", "")
        try:
            if "region" in params:
                region = self.topology.region(params["region"]).name
            elif "near" in params:
                region = self.topology.nearest_regions(params["near"])[0][0]
            else:
                return JSONResponse(
                    {
                        "error": "give ?region=R or ?near=NODE_OR_REGION",
                        "regions": sorted(self.topology.regions),
                    },
                    status_code=400,
                )
        except TopologyError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(await self.replicas[region].remote(text))


def app(args: dict[str, str]) -> serve.Application:
    """Serve application builder; ``args``: ``topology`` (a path or preset name, default ``local``)."""
    topology = load_topology(resolve_topology_path(args.get("topology")))
    replicas = {
        name: RegionReplica.options(  # type: ignore[attr-defined]
            name=f"replica-{name}",
            ray_actor_options={"num_cpus": 0, "label_selector": {REGION_LABEL: name}},
        ).bind(name)
        for name in topology.regions
    }
    return RegionIngress.bind(str(topology.path), replicas)  # type: ignore[attr-defined]

"""Child process for :func:`edgeray.cluster.probe_nodes`: print the GCS node table as JSON.

    python -m edgeray._probe HOST:PORT

Kept in its own process so that the caller can bound it with a hard timeout.
"""

from __future__ import annotations

import json
import sys


def main(address: str) -> None:
    from ray._raylet import GcsClient  # type: ignore[attr-defined]

    client = GcsClient(address=address)
    table = client.get_all_node_info(timeout=10)
    nodes = []
    for node_id, info in table.items():
        nodes.append(
            {
                "node_id": node_id.hex(),
                "alive": info.state == 0,  # GcsNodeInfo.ALIVE
                "labels": dict(info.labels),
                "resources": dict(info.resources_total),
                "ip": info.node_manager_address,
                "name": info.node_name,
            }
        )
    json.dump(nodes, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])

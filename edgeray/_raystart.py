"""``ray start`` for one raylet of a local edgeray cluster, with a runtime-env directory of its own.

    python -m edgeray._raystart NODE start --address ...

Every raylet of a local cluster shares one session directory. On each node, Ray unpacks a job's
``working_dir`` into ``<session>/runtime_resources/working_dir_files/<package>`` and removes a copy already
there first (``download_and_unpack_package(..., overwrite=True)`` in Ray's runtime_env/working_dir.py).
With one such directory for every raylet, a node unpacking a package deletes the copy in which other
nodes' workers, or a running job's driver, already run: they die with ``FileNotFoundError`` from
``os.getcwd()``. On a real cluster each host has its own directory; this gives each raylet one too
(``runtime_resources_<NODE>``), through the name Ray's node parameters take it from.
"""

from __future__ import annotations

import sys


def main() -> None:
    node, args = sys.argv[1], sys.argv[2:]
    from ray._private import ray_constants

    ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME = f"runtime_resources_{node}"
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *args]
    ray_main()


if __name__ == "__main__":
    main()

"""The fleet simulator as a Ray job: the same arguments as `edgeray sim`.

    ray job submit --working-dir . -- python jobs/simulate.py nodes=10000,regions=50 --rounds 100 --out /tmp/sim

It needs no cluster resources (numpy in the job's driver); it is here so a user who runs everything through
`ray job submit` can run this too. See edgeray/sim/engine.py for what is modelled (loss is not).
"""

from __future__ import annotations

import sys

from edgeray.cli import main

if __name__ == "__main__":
    main(["sim", *sys.argv[1:]], prog_name="jobs/simulate.py")

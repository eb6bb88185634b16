"""Place one actor in every region of the topology and show where each landed (the main job).

    eval "$(edgeray env)"
    ray job submit --working-dir . -- python jobs/place_regions.py --topology clusters/local.yaml

A thin entrypoint over :mod:`edgeray.demo`, which ``edgeray demo`` / ``make demo`` submit too.
"""

import sys

from edgeray.demo import main

if __name__ == "__main__":
    sys.exit(main())

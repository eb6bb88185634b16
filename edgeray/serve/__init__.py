"""Serving on the edge fleet: Ray Serve applications whose replicas are pinned to topology regions.

serve run edgeray.serve:app            # the regional OpenAI-compatible app (edgeray.serve.app)
"""

from edgeray.serve.app import app

__all__ = ["app"]

"""Serving on the edge fleet: Ray Serve applications whose replicas are pinned to topology regions."""

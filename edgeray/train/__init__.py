"""Training across the edge fleet: pipeline stages as actors (more strategies as they land)."""

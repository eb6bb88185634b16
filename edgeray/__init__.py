"""edgeray: a Ray-based actor runtime for decentralized LLM training and inference on edge networks."""

__version__ = "0.1.0"

"""The edge fabric: every byte that crosses nodes in training is charged its link's cost and recorded.

links    LinkModel: transfer time of n bytes over a topology link (latency, bandwidth, jitter, loss)
ledger   Ledger: bytes, modelled and measured seconds per link class; saved as Parquet
codecs   fp16, int8 / int4 blockwise, top-k with error feedback: what goes on the wire
groups   RunGroups: group names unique to a run, its rendezvous keys removed when it ends; join / leave
backend  EdgeGroup: a ray.util.collective backend (one gloo process group + store per group)
"""

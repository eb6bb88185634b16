"""Packet-level WAN emulation: every raylet in its own network namespace behind a userspace router.

``edgeray up FILE --wan`` (edgeray.cluster.up(wan=True)) runs the head and each topology node in a network
namespace of its own (edgeray.wan.netns) and one router process (edgeray.wan.router) that enforces every
topology link between them: latency, seeded jitter, loss, rate and a bandwidth-delay-product queue. Ray's
control plane, object transfers, Serve's HTTP and the fabric's tensors all pay the links.
"""

WAN_ENV = "EDGERAY_WAN"
"""Set (to the cluster's name) for every raylet of a ``--wan`` cluster, so for every worker, and for drivers
by ``edgeray env``: the packet-level network carries the link model, so the fabric stops adding its
in-process delay (edgeray.fabric.backend.Fabric.packet_level) while its ledger still counts the bytes."""


def packet_level() -> bool:
    """True in a process of a ``--wan`` cluster."""
    import os

    return bool(os.environ.get(WAN_ENV))

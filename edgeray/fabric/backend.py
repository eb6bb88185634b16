"""EdgeGroup: a ``ray.util.collective`` backend where one actor can be in many groups, over emulated links.

    from edgeray.fabric.backend import Fabric, install
    install(Fabric.from_topology(topology, node="campus-gw", time_scale=1.0))   # once per process
    col.init_collective_group(world_size, rank, backend="EDGERAY", group_name="region/campus")

Why a backend of our own: Ray's GLOO backend calls ``init_process_group`` once per process and derives later
groups from the first one's ranks, so an actor cannot be in a regional group *and* the leaders' group
(it hangs, or returns wrong sums). Here every group has its own rendezvous ``TCPStore`` (published through Ray's internal KV)
and its own ``ProcessGroupGloo``. Where every member of a group has a CUDA device (and torch has NCCL), the
group also gets its own ``ProcessGroupNCCL`` on the same store and moves every payload over it, on the
process's current CUDA device (``Fabric.transport``: "auto" = NCCL where possible, "gloo" = never); the
emulation header always travels over gloo. Results come back on the caller's tensor's device.

Every transfer is made by the sender: it asks the :class:`~edgeray.fabric.links.LinkModel` what the bytes
cost on the link between the two topology nodes, sends, and both ends wait until ``time_scale`` x that time
has passed (0 = account only); it records bytes, modelled and measured seconds in the process's
:class:`~edgeray.fabric.ledger.Ledger`. Gloo's TCP transport sends a buffer only once the receiver's
receive has been posted and its ready notice has crossed the link back, so the bytes leave at
max(send posted, receive posted + one-way latency) (:func:`~edgeray.fabric.links.departure`): the
receiver applies that rule to its modelled clock and, when emulating in real time, to its wait.
Collectives are built from these transfers, so the ledger holds exactly the bytes each link carried.

Failure: every rendezvous and transfer is bounded by ``timeout_s``; a dead or stuck peer raises
:class:`FabricError` naming the group, the operation and the peer (rank and node), never a hang.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from ray.util.collective.collective_group.base_collective_group import BaseGroup

from edgeray.errors import EdgerayError
from edgeray.fabric.codecs import Codec, get_codec
from edgeray.fabric.ledger import Ledger
from edgeray.fabric.links import LinkModel, departure, expected_s
from edgeray.topology import Topology
from edgeray.wan import packet_level

BACKEND = "EDGERAY"
_KV_PREFIX = "edgeray-fabric/"
Flows = Sequence[tuple[str, str]]
_HEADER = 4  # float64 values of the emulation header (see EdgeGroup._send_parts)
TRANSPORTS = ("auto", "gloo")


def nccl_capable() -> bool:
    """This process can join NCCL communicators: a visible CUDA device and a torch built with NCCL."""
    return torch.cuda.is_available() and dist.is_nccl_available()


class FabricError(EdgerayError):
    """A collective could not complete: a peer died or stalled past the timeout, or a group is unknown."""


class Arrivals:
    """What receivers saw: one row per message, seconds from the sender's send to its use here.

    Sends complete lazily (at the end of a pipeline step), so the sender's own timing is not a link
    measurement; the receiver's is, when it was already waiting. A receiver that came late inflates a
    sample, never shrinks it, so per-link minima over a window are what a link delivers (like ping's
    minimum round trip). Keeps the latest ``maxlen`` rows."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self._rows: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def record(self, op: str, src: str, dst: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._rows.append({"op": op, "src": src, "dst": dst, "bytes": nbytes, "seconds": seconds})

    def take(self) -> list[dict[str, Any]]:
        """The rows recorded so far, clearing them."""
        with self._lock:
            rows = list(self._rows)
            self._rows.clear()
        return rows


@dataclass
class Fabric:
    """Per-process fabric settings: the topology, this process's node, the link model and the ledger."""

    topology: Topology
    node: str
    """Topology node this process runs on."""
    time_scale: float = 0.0
    """Wait this many times the modelled transfer time (0 = account only, 1 = real time)."""
    timeout_s: float = 60.0
    """Bound on every rendezvous and transfer."""
    seed: int = 0
    actual: Topology | None = None
    """The network as it really is, when it differs from ``topology`` (what was declared and planned
    with): links are emulated from ``actual``; planning still reads ``topology``. None = as declared."""
    packet_level: bool = field(default_factory=packet_level)
    """The network itself emulates the links (a ``--wan`` cluster, edgeray.wan): transfers take what the
    packets take and nothing is added in-process, except, with ``actual``, what its links cost beyond the
    declared ones the packets pay (``time_scale`` x the difference); the ledger and the modelled clock are
    kept as everywhere."""
    transport: str = "auto"
    """Payload transport of each group: "auto" = NCCL when every member has CUDA, else gloo; "gloo"."""
    ledger: Ledger = field(default_factory=Ledger)
    arrivals: Arrivals = field(default_factory=lambda: Arrivals())
    """Receiver-side timings (sent -> usable here), what re-planning measures links with."""
    links: LinkModel = field(init=False)
    clock: float = 0.0
    """Modelled seconds this process has reached (the one clock of every fabric user): work is charged by
    :meth:`compute` (or measured inside :meth:`working`) times the node's slowdown; a message leaves at
    max(the sender's clock when it sent, the receiver's clock when it posted the receive + the link's
    one-way latency: gloo's ready notice) and reaches its receiver the link model's time later; a
    receiver's clock moves to that instant if it is later; a sender's moves to its clock when it sent plus
    the link model's time once its send completes (it cannot see when the receiver posted)."""
    busy: float = 0.0
    """Modelled seconds of work charged so far (what the energy model counts as busy; a caller may read
    and reset it per step)."""
    _work_mark: float | None = field(default=None, init=False, repr=False)

    def compute(self, seconds: float) -> float:
        """Charge ``seconds`` of work at reference speed: the clock advances that times this node's
        slowdown. Returns the clock."""
        work = seconds * self.topology.nodes[self.node].slowdown
        self.clock += work
        self.busy += work
        return self.clock

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """Charge the enclosed code's wall time as work, except the time it spends blocked on the fabric
        (work done before a receive is charged before the message's arrival is applied)."""
        self._work_mark = time.perf_counter()
        try:
            yield
        finally:
            self.charge_work()
            self._work_mark = None

    def charge_work(self) -> None:
        """Inside :meth:`working`: charge the work since the last charge (called at every fabric boundary)."""
        if self._work_mark is not None:
            now = time.perf_counter()
            self.compute(now - self._work_mark)
            self._work_mark = now

    def _not_work(self) -> None:
        """What just happened was blocking on the fabric: the next work starts now."""
        if self._work_mark is not None:
            self._work_mark = time.perf_counter()

    def __post_init__(self) -> None:
        self.topology.node(self.node)  # raises with the valid names
        if self.transport not in TRANSPORTS:
            raise FabricError(f"Fabric.transport = {self.transport!r}: valid values are {list(TRANSPORTS)}")
        # Each process draws its own jitter/loss stream, reproducible per (seed, node): crc32, not hash(),
        # which Python salts per process.
        self.links = LinkModel(
            self.actual or self.topology, seed=zlib.crc32(f"{self.seed}/{self.node}".encode())
        )

    @classmethod
    def from_topology(cls, topology: Topology, *, node: str, **kwargs: Any) -> Fabric:
        return cls(topology=topology, node=node, **kwargs)


_installed: Fabric | None = None
_install_lock = threading.Lock()


def install(fabric: Fabric) -> None:
    """Make ``fabric`` this process's fabric and register the EDGERAY backend with ray.util.collective.

    ray.util.collective builds groups as ``cls(world_size, rank, group_name)``, so per-process settings
    cannot be passed in; they live here. Call once in the driver and in every actor before joining groups.
    """
    global _installed
    from ray.util.collective.backend_registry import _global_registry, register_collective_backend

    with _install_lock:
        _installed = fabric
        if not _global_registry.is_registered(BACKEND):
            register_collective_backend(BACKEND, EdgeGroup)


def current() -> Fabric:
    if _installed is None:
        raise FabricError("no fabric installed in this process: call edgeray.fabric.backend.install() first")
    return _installed


def _sleep_until(instant: float) -> None:
    delay = instant - time.time()
    if delay > 0:
        time.sleep(delay)


def _unwrap(tensor: Any) -> torch.Tensor:
    """ray.util.collective passes tensors wrapped in a one-element list."""
    if isinstance(tensor, list):
        if len(tensor) != 1:
            raise FabricError(f"expected one tensor, got {len(tensor)}")
        tensor = tensor[0]
    if not isinstance(tensor, torch.Tensor):
        raise FabricError(f"the edge fabric moves torch tensors, got {type(tensor).__name__}")
    return tensor


class EdgeGroup(BaseGroup):
    """One collective group: its own store and gloo process group, emulated links, ledger accounting."""

    _by_name: ClassVar[dict[str, EdgeGroup]] = {}

    def __init__(self, world_size: int, rank: int, group_name: str) -> None:
        super().__init__(world_size, rank, group_name)
        self.fabric = current()
        self._timeout = datetime.timedelta(seconds=self.fabric.timeout_s)
        self._store = self._rendezvous()
        # typed Any: torch's stubs omit the point-to-point methods of backend objects
        self._pg: Any = dist.ProcessGroupGloo(self._store, rank, world_size, self._gloo_options())
        self._store.set(f"node/{rank}", self.fabric.node)
        self.nodes: list[str] = [self._store.get(f"node/{r}").decode() for r in range(world_size)]
        links = self.fabric.links.topology
        # each peer's link latency: how long gloo's ready notice takes between here and there
        self._notices = [links.link(self.fabric.node, n).latency_ms / 1e3 for n in self.nodes]
        wants = self.fabric.transport == "auto" and nccl_capable()
        self._store.set(f"nccl/{rank}", "1" if wants else "0")
        # Every member decides from the same published flags, so all agree on the group's transport.
        self.transport = (
            "nccl" if all(self._store.get(f"nccl/{r}") == b"1" for r in range(world_size)) else "gloo"
        )
        self._device = torch.device("cpu")
        self._payload_pg: Any = self._pg
        if self.transport == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())
            self._payload_pg = self._nccl_group()
        EdgeGroup._by_name[group_name] = self

    # ------------------------------------------------------------------ set-up
    def _rendezvous(self) -> dist.Store:
        import ray
        import ray.experimental.internal_kv as kv

        key = _KV_PREFIX + self.group_name
        deadline = time.monotonic() + self.fabric.timeout_s
        if self.rank == 0:
            host = ray.util.get_node_ip_address()
            # Listen on this node's cluster address only: given a port alone, torch's store listens on
            # every interface, unauthenticated. The store takes the socket over (and closes it).
            listener = socket.create_server((host, 0), backlog=max(128, self.world_size))
            port = listener.getsockname()[1]
            master = dist.TCPStore(
                host, port, self.world_size, True, timeout=self._timeout, wait_for_workers=False,
                master_listen_fd=listener.detach(),
            )  # fmt: skip
            kv._internal_kv_put(key, f"{host}:{master.port}", overwrite=True)
            store: dist.Store = master
        else:
            while (addr := kv._internal_kv_get(key)) is None:
                if time.monotonic() > deadline:
                    raise FabricError(
                        f"group {self.group_name!r}: rank 0 did not publish its rendezvous within "
                        f"{self.fabric.timeout_s:.0f} s (is it alive, and in the same group?)"
                    )
                time.sleep(0.05)
            host, port = addr.decode().rsplit(":", 1)
            store = dist.TCPStore(host, int(port), self.world_size, False, timeout=self._timeout)
        self._master = store if self.rank == 0 else None  # keep the server alive with the group
        return dist.PrefixStore(self.group_name, store)

    def _gloo_options(self) -> Any:
        """Gloo on this node's cluster address. Left to itself gloo binds the address the host name
        resolves to (often 127.0.0.1), which peers in other network namespaces (``edgeray up --wan``) or
        on other hosts cannot reach."""
        import ray

        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=ray.util.get_node_ip_address())]
        options._timeout = self._timeout
        options._threads = 2  # gloo's default
        return options

    def _nccl_group(self) -> Any:
        """An NCCL process group on this group's store; waits raise on timeout instead of aborting."""
        import os

        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = self._timeout
        return dist.ProcessGroupNCCL(
            dist.PrefixStore("nccl/", self._store), self.rank, self.world_size, options
        )

    @classmethod
    def get(cls, group_name: str) -> EdgeGroup:
        """The group this process joined under ``group_name``; :class:`FabricError` lists joined groups."""
        try:
            return cls._by_name[group_name]
        except KeyError:
            raise FabricError(
                f"this process is not in group {group_name!r}; it is in {sorted(cls._by_name)}"
            ) from None

    def destroy_group(self) -> None:
        EdgeGroup._by_name.pop(self.group_name, None)
        if self.rank == 0:
            import ray.experimental.internal_kv as kv

            with contextlib.suppress(Exception):  # the cluster may already be gone at teardown
                kv._internal_kv_del(_KV_PREFIX + self.group_name)

    @classmethod
    def backend(cls) -> str:
        return BACKEND

    @classmethod
    def check_backend_availability(cls) -> bool:
        return dist.is_available()

    # ------------------------------------------------------------------ transfers
    def _wait(self, work: Any, op: str, peer: int) -> None:
        try:
            work.wait(self._timeout)
        except RuntimeError as exc:
            raise FabricError(
                f"group {self.group_name!r} {op}: peer rank {peer} (node {self.nodes[peer]}) did not complete "
                f"within {self.fabric.timeout_s:.0f} s: {str(exc).splitlines()[0][:200]}"
            ) from None

    def _post(self, start: Callable[[], Any], op: str, peer: int) -> Any:
        """Start a send / receive; a connection the peer already broke raises FabricError here too."""
        try:
            return start()
        except RuntimeError as exc:
            raise FabricError(
                f"group {self.group_name!r} {op}: peer rank {peer} (node {self.nodes[peer]}) is unreachable: "
                f"{str(exc).splitlines()[0][:200]}"
            ) from None

    def _send_parts(
        self, parts: list[torch.Tensor], dst: int, op: str, flows: Flows = ()
    ) -> tuple[list[Any], Callable[[], None]]:
        """Charge and start sending ``parts`` to ``dst``; returns the works and a finisher.

        The link model gives the transfer's time; the first message (the header) carries the wall-clock
        instant it was sent, the emulated wait (time_scale x modelled) and the sender's modelled clock. The
        sender (``finish``) waits until sent + wait before its link is free again; the receiver waits until
        max(sent, its receive posted + time_scale x the one-way latency) + wait before it uses the data
        (gloo's ready notice, :func:`~edgeray.fabric.links.departure`). A transfer thus takes
        max(modelled, actual) and the ledger records the bytes, the modelled and the measured seconds.
        All processes of a local cluster share one clock, which is what makes the instants meaningful.
        ``flows``: every (src node, dst node) transfer of the same step, for the link model's contention.
        """
        nbytes = sum(p.numel() * p.element_size() for p in parts)
        transfer = self.fabric.links.transfer(self.fabric.node, self.nodes[dst], nbytes, concurrent=flows)
        fabric = self.fabric
        fabric.charge_work()
        arrival = fabric.clock + transfer.seconds  # modelled instant the message is at dst
        t0 = time.perf_counter()
        wait_s = transfer.seconds
        if fabric.packet_level:  # the packets pay the declared links; emulate only what `actual` adds
            wait_s = 0.0
            if fabric.actual is not None:
                declared = expected_s(fabric.topology.link(fabric.node, self.nodes[dst]), nbytes)
                wait_s = max(0.0, transfer.seconds - declared)
        sent = time.time()
        due = sent + wait_s * fabric.time_scale
        # emulation metadata, not counted as traffic: when the bytes were sent (wall clock), the sender's
        # modelled clock, the modelled transfer seconds and the emulated wall-clock wait
        header = torch.tensor(
            [sent, fabric.clock, transfer.seconds, wait_s * fabric.time_scale], dtype=torch.float64
        )
        # gloo / NCCL read these buffers asynchronously: they stay alive until finish() (the closure holds them).
        buffers = [header, *(p.to(self._device).contiguous() for p in parts)]
        works = [self._post(lambda: self._pg.send([header], dst, 0), op, dst)]
        works += [
            self._post(functools.partial(self._payload_pg.send, [t], dst, 0), op, dst) for t in buffers[1:]
        ]

        def finish() -> None:
            fabric.charge_work()
            for w in works:
                self._wait(w, op, dst)
            buffers.clear()
            _sleep_until(due)
            fabric._not_work()
            fabric.clock = max(fabric.clock, arrival)  # the link is free again
            fabric.ledger.record(
                op, self.group_name, transfer, time.perf_counter() - t0, notice_s=self._notices[dst]
            )

        return works, finish

    def _recv_parts(
        self,
        layout: list[tuple[tuple[int, ...], torch.dtype]],
        src: int,
        op: str,
        device: torch.device | None = None,
    ) -> list[torch.Tensor]:
        """Receive one message; the parts are returned on ``device`` (default: the CPU)."""
        return self._post_recv_parts(layout, src, op, device)()

    def _post_recv_parts(
        self,
        layout: list[tuple[tuple[int, ...], torch.dtype]],
        src: int,
        op: str,
        device: torch.device | None = None,
    ) -> Callable[[], list[torch.Tensor]]:
        """Post the receive of one message now; the returned finisher waits for it and returns its parts.

        A posted receive lets the transport move the bytes while this process computes (gloo starts a
        transfer only once the receiver has posted a buffer for it). Receives from one source complete
        in the order they were posted, which must be the order that source sends in."""
        fabric = self.fabric
        fabric.charge_work()
        posted_clock, posted_wall = fabric.clock, time.time()
        notice_s = self._notices[src]
        # packet level: the ready notice really crosses the link, nothing to emulate
        notice_wall = 0.0 if fabric.packet_level else notice_s * fabric.time_scale
        header = torch.empty(_HEADER, dtype=torch.float64)
        bufs = [torch.empty(shape, dtype=dt, device=self._device) for shape, dt in layout]
        works = [self._post(lambda: self._pg.recv([header], src, 0), op, src)]
        works += [self._post(functools.partial(self._payload_pg.recv, [b], src, 0), op, src) for b in bufs]

        def finish() -> list[torch.Tensor]:
            fabric.charge_work()
            for w in works:
                self._wait(w, op, src)
            if self.transport == "nccl":
                torch.cuda.current_stream().synchronize()
            sent, send_clock, transfer_s, wait_s = header.tolist()
            _sleep_until(float(departure(sent, posted_wall, notice_wall)) + wait_s)
            fabric._not_work()
            arrival = float(departure(send_clock, posted_clock, notice_s)) + transfer_s
            fabric.clock = max(fabric.clock, arrival)
            fabric.arrivals.record(
                op,
                self.nodes[src],
                fabric.node,
                sum(b.numel() * b.element_size() for b in bufs),
                time.time() - sent,
            )
            out = device or torch.device("cpu")
            return [b.to(out) for b in bufs]

        return finish

    def _exchange(
        self,
        payload: torch.Tensor,
        dst: int,
        src: int,
        recv_numel: int,
        codec: Codec,
        op: str,
        flows: Flows = (),
        key: str = "",
    ) -> torch.Tensor:
        """Send ``payload`` (encoded) to ``dst`` while receiving ``recv_numel`` values from ``src``."""
        _, finish = self._send_parts(codec.encode(payload, key), dst, op, flows)
        incoming = codec.decode(
            self._recv_parts(codec.wire_layout(recv_numel), src, op, payload.device), recv_numel
        )
        finish()
        return incoming

    # ------------------------------------------------------------------ collectives (edgeray API)
    def ring_allreduce(
        self, tensor: torch.Tensor, codec: Codec | str = "none", key: str = ""
    ) -> torch.Tensor:
        """Sum ``tensor`` over the group in place: ring reduce-scatter then ring all-gather.

        Each rank sends 2(n-1)/n of the tensor (encoded by ``codec``). A codec that cannot be re-encoded hop
        by hop (top-k) all-gathers every rank's encoded tensor instead: (n-1) payloads per rank.
        """
        codec = get_codec(codec) if isinstance(codec, str) else codec
        n = self.world_size
        if n == 1:
            return tensor
        flat = tensor.data.view(-1)
        if not codec.ring_compatible:
            return self._allgather_sum(tensor, codec, key)
        nxt, prv, ring = (self.rank + 1) % n, (self.rank - 1) % n, self.ring_flows()
        chunks = list(torch.tensor_split(flat, n))  # views into tensor
        for s in range(n - 1):  # reduce-scatter: afterwards rank r owns the full sum of chunk (r+1) % n
            send_i, recv_i = (self.rank - s) % n, (self.rank - s - 1) % n
            chunks[recv_i] += self._exchange(
                chunks[send_i], nxt, prv, chunks[recv_i].numel(), codec, "allreduce", ring
            )
        own = (self.rank + 1) % n
        if codec.name != "none":  # every rank must end with the same (decoded) values
            chunks[own].copy_(codec.decode(codec.encode(chunks[own]), chunks[own].numel()))
        for s in range(n - 1):  # all-gather
            send_i, recv_i = (self.rank + 1 - s) % n, (self.rank - s) % n
            chunks[recv_i].copy_(
                self._exchange(chunks[send_i], nxt, prv, chunks[recv_i].numel(), codec, "allreduce", ring)
            )
        return tensor

    def _allgather_sum(self, tensor: torch.Tensor, codec: Codec, key: str) -> torch.Tensor:
        n, numel = self.world_size, tensor.numel()
        nxt, prv = (self.rank + 1) % n, (self.rank - 1) % n
        parts = codec.encode(tensor, key)
        total = codec.decode(parts, numel)
        for _ in range(n - 1):  # pass each rank's encoded tensor once around the ring
            _, finish = self._send_parts(parts, nxt, "allreduce", self.ring_flows())
            parts = self._recv_parts(codec.wire_layout(numel), prv, "allreduce", tensor.device)
            finish()
            total += codec.decode(parts, numel)
        tensor.data.view(-1).copy_(total)
        return tensor

    def reduce_to(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Sum into ``root``'s tensor (direct sends to the root); other ranks' tensors are unchanged."""
        if self.rank == root:  # every receive posted at once, so every member's bytes move at once
            finishers = [
                self._post_recv_parts([(tuple(tensor.shape), tensor.dtype)], src, "reduce", tensor.device)
                for src in range(self.world_size)
                if src != root
            ]
            for received in finishers:
                tensor += received()[0]
        elif self.world_size > 1:
            flows = [(self.nodes[r], self.nodes[root]) for r in range(self.world_size) if r != root]
            _, finish = self._send_parts([tensor], root, "reduce", flows)
            finish()
        return tensor

    def broadcast_from(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Copy ``root``'s tensor into every rank's tensor (the root sends to each rank)."""
        if self.rank == root:
            flows = [(self.nodes[root], self.nodes[d]) for d in range(self.world_size) if d != root]
            finishers = [
                self._send_parts([tensor], dst, "broadcast", flows)[1]
                for dst in range(self.world_size)
                if dst != root
            ]
            for finish in finishers:
                finish()
        else:
            tensor.copy_(
                self._recv_parts([(tuple(tensor.shape), tensor.dtype)], root, "broadcast", tensor.device)[0]
            )
        return tensor

    def send_to(self, tensor: torch.Tensor, dst: int, codec: Codec | str = "none") -> None:
        codec = get_codec(codec) if isinstance(codec, str) else codec
        _, finish = self._send_parts(codec.encode(tensor), dst, "send")
        finish()

    def recv_from(self, tensor: torch.Tensor, src: int, codec: Codec | str = "none") -> torch.Tensor:
        codec = get_codec(codec) if isinstance(codec, str) else codec
        parts = self._recv_parts(codec.wire_layout(tensor.numel()), src, "recv", tensor.device)
        tensor.data.view(-1).copy_(codec.decode(parts, tensor.numel()))
        return tensor

    def send_raw(self, tensor: torch.Tensor, dst: int, op: str = "send") -> Callable[[], None]:
        """Start sending ``tensor`` as it is (any dtype, no codec); returns the finisher to call later."""
        return self._send_parts([tensor.contiguous()], dst, op)[1]

    def recv_raw(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        src: int,
        op: str = "recv",
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Receive one tensor of ``shape`` and ``dtype`` sent with :meth:`send_raw` (on ``device``)."""
        return self._recv_parts([(shape, dtype)], src, op, device)[0]

    def post_recv_raw(
        self, shape: tuple[int, ...], dtype: torch.dtype, src: int, op: str = "recv"
    ) -> Callable[[], torch.Tensor]:
        """Post the receive of one :meth:`send_raw` tensor now; the returned finisher waits for it.

        Post receives from one source in the order it sends; see :meth:`_post_recv_parts`."""
        finish = self._post_recv_parts([(shape, dtype)], src, op)
        return lambda: finish()[0]

    def pair_exchange(
        self, tensor: torch.Tensor, peer: int, op: str = "gossip", flows: Flows = ()
    ) -> torch.Tensor:
        """Swap tensors with ``peer`` (both directions charged); returns the peer's tensor.

        ``flows``: all pairs exchanging in the same round (contention), as (src node, dst node).
        """
        return self._exchange(
            tensor.reshape(-1), peer, peer, tensor.numel(), get_codec("none"), op, flows
        ).view_as(tensor)

    def ring_flows(self) -> list[tuple[str, str]]:
        """The (src node, dst node) transfers of one ring step: every rank to the next."""
        return [(self.nodes[r], self.nodes[(r + 1) % self.world_size]) for r in range(self.world_size)]

    # ------------------------------------------------------------------ ray.util.collective API
    def allreduce(self, tensor: Any, allreduce_options: Any = None) -> None:
        from ray.util.collective.types import ReduceOp

        op = getattr(allreduce_options, "reduceOp", ReduceOp.SUM)
        if op != ReduceOp.SUM:
            raise FabricError(f"the edge fabric all-reduces with SUM only, got {op}")
        self.ring_allreduce(_unwrap(tensor))

    def barrier(self, barrier_options: Any = None) -> None:
        self._wait(self._pg.barrier(), "barrier", (self.rank + 1) % self.world_size)

    def reduce(self, tensor: Any, reduce_options: Any = None) -> None:
        self.reduce_to(_unwrap(tensor), getattr(reduce_options, "root_rank", 0))

    def allgather(self, tensor_list: Any, tensor: Any, allgather_options: Any = None) -> None:
        outs = tensor_list[0] if isinstance(tensor_list[0], list) else tensor_list
        mine = _unwrap(tensor)
        n, nxt, prv = self.world_size, (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        outs[self.rank].copy_(mine)
        for s in range(n - 1):
            send_i, recv_i = (self.rank - s) % n, (self.rank - s - 1) % n
            outs[recv_i].copy_(
                self._exchange(
                    outs[send_i].reshape(-1),
                    nxt,
                    prv,
                    mine.numel(),
                    get_codec("none"),
                    "allgather",
                    self.ring_flows(),
                ).view_as(mine)
            )

    def broadcast(self, tensor: Any, broadcast_options: Any = None) -> None:
        self.broadcast_from(_unwrap(tensor), getattr(broadcast_options, "root_rank", 0))

    def reducescatter(self, tensor: Any, tensor_list: Any, reducescatter_options: Any = None) -> None:
        """Ray API reduce-scatter, done as a full ring all-reduce (twice the bytes of a bare reduce-scatter;
        edgeray's own collectives do not use it)."""
        inputs = tensor_list[0] if isinstance(tensor_list[0], list) else tensor_list
        flat = torch.cat([t.reshape(-1) for t in inputs]).clone()
        self.ring_allreduce(flat)
        _unwrap(tensor).copy_(torch.tensor_split(flat, self.world_size)[self.rank].view_as(_unwrap(tensor)))

    def send(self, tensor: Any, send_options: Any) -> None:
        self.send_to(_unwrap(tensor), send_options.dst_rank)

    def recv(self, tensor: Any, recv_options: Any) -> None:
        self.recv_from(_unwrap(tensor), recv_options.src_rank)

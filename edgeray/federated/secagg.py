"""Secure aggregation in the style of SecAgg+ (Bell et al. 2020, after Bonawitz et al. 2017): the server learns
the sum of the clients' quantised updates and nothing else, and recovers the sum when clients drop out after
masking.

    clients = {cid: SecAggClient(cid, params) for cid in ids}        # one per client and round
    server = SecAggServer(params)
    total = run_round(server, clients, {cid: q for cid, q in quantised.items()}, drop_after_masking={3, 7})

Per round, for clients ``ids`` (ints) on a sparse neighbour graph (each client has ``neighbours`` others,
about 2 log2 n, on a ring in a seeded random order, :func:`neighbour_graph`):

1. **advertise**: each client makes two X25519 key pairs, one to encrypt shares (``c``), one to agree masks
   (``s``), and sends the public halves.
2. **share keys**: each client draws a self-mask seed ``b``, commits to it (SHA-256, bound to round and
   client), and Shamir-shares ``b`` and its mask private key over the prime field 2^521 - 1 with threshold
   ``t`` among its neighbours and itself. Each neighbour's share pair travels encrypted and authenticated
   (ChaCha20-Poly1305 under HKDF(X25519(c_i, c_j)), the round and both ids as associated data) through the
   server, which cannot read it.
3. **masked input**: ``y_i = q_i + PRG(b_i) + sum_j +-PRG(s_ij) mod 2^32`` over the neighbours ``j`` whose
   shares arrived (those that finished step 2), with ``s_ij`` =
   HKDF(X25519(s_i, s_j), round, pair) and the sign set by the ids' order so pair masks cancel in the sum;
   PRG is the ChaCha20 keystream.
4. **unmask**: the server names the survivors and the dropped; each surviving neighbour reveals, per
   neighbour, the share of ``b`` (survivor) or of the mask key (dropped), never both. The server rebuilds
   each survivor's ``b`` (checked against its commitment) and each dropped client's mask key (checked against
   its public key: a lying share is detected, not summed), removes the self masks and the dropped clients'
   pair masks, and holds the exact sum mod 2^32.

Threat model: an honest-but-curious server, and fewer than ``t`` colluding neighbours of any client. A
server that lies about who dropped (telling some neighbours a client survived and others that it dropped)
is not defended against: there is no consistency round. A client with fewer than ``t`` surviving share
holders makes the round abort (:class:`SecAggAbort`, naming it); a share that fails authentication or a
commitment raises :class:`SecAggError` naming the clients. The server object never holds an unmasked
individual update: only masked vectors, their running sum, and at the end the unmasked sum. Quantisation (:func:`quantize`, :func:`dequantize`)
clips an update to L2 norm ``clip`` and rounds it stochastically to integers that sum without overflow for
up to ``clients`` clients, so the unmasked integer sum is exact.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgeray.errors import EdgerayError

PRIME = 2**521 - 1
"""The Shamir field: a Mersenne prime above every 32-byte secret."""
MOD = 2**32
_RAW = serialization.Encoding.Raw
_PUB = serialization.PublicFormat.Raw
_PRIV = serialization.PrivateFormat.Raw
_NOENC = serialization.NoEncryption()


class SecAggError(EdgerayError):
    """A secure-aggregation message failed a check (authentication, commitment, protocol order)."""


class SecAggAbort(SecAggError):
    """Too few clients left to unmask the round: it ends without a sum."""


@dataclass(frozen=True)
class SecAggParams:
    round: int
    clients: tuple[int, ...]
    """Every client id taking part in this round (advertised keys)."""
    neighbours: int
    """Neighbours per client (even; the graph is a ring with neighbours/2 on each side). A client's secrets are
    shared among its neighbours and itself."""
    threshold: int
    """Shares that rebuild a secret: up to t - 1 of a client's neighbours colluding with the server learn
    nothing of its secrets."""
    vector_len: int
    graph_seed: int = 0

    @classmethod
    def make(
        cls,
        round: int,
        clients: Iterable[int],
        vector_len: int,
        *,
        neighbours: int | None = None,
        threshold: int | None = None,
        graph_seed: int = 0,
        dropout: float = 0.3,
    ) -> SecAggParams:
        """Defaults: 2 ceil(log2 n) neighbours (capped at n - 1, made even) and the largest threshold with which a
        round where a fraction ``dropout`` (default :data:`MAX_DROPOUT`) of the clients drop at random aborts
        with probability at most :data:`ABORT_PROBABILITY` (:func:`default_threshold`)."""
        ids = tuple(sorted(set(clients)))
        n = len(ids)
        problems = []
        if n < 2:
            problems.append(f"clients = {list(ids)}: secure aggregation needs at least 2")
        if vector_len < 1:
            problems.append(f"vector_len = {vector_len}: must be >= 1")
        if any(c < 0 for c in ids):
            problems.append("clients: ids must be >= 0")
        if problems:
            raise SecAggError("secagg: " + "; ".join(problems))
        k = neighbours if neighbours is not None else 2 * math.ceil(math.log2(n))
        k = min(k, n - 1)
        if k < n - 1 and k % 2:
            k += 1  # a ring needs an even count, unless it is everyone else
        k = min(k, n - 1)
        t = threshold if threshold is not None else default_threshold(n, k, dropout)
        if not 1 <= t <= k:
            raise SecAggError(f"secagg: threshold = {t}: must be in [1, neighbours = {k}]")
        return cls(round, ids, k, t, vector_len, graph_seed)


MAX_DROPOUT = 0.3
"""The dropout after masking the default threshold is sized for."""
ABORT_PROBABILITY = 0.01


def abort_probability(n: int, k: int, t: int, dropout: float) -> float:
    """A bound (union over clients) on the chance that a round with each client dropping independently with
    probability ``dropout`` after masking aborts: some client, dropped, has fewer than ``t`` surviving
    neighbours (a survivor also holds its own share, so it fails less often)."""
    up = 1 - dropout
    below = sum(math.comb(k, i) * up**i * dropout ** (k - i) for i in range(t))
    return min(1.0, n * below)


def default_threshold(n: int, k: int, dropout: float = MAX_DROPOUT, risk: float = ABORT_PROBABILITY) -> int:
    """The largest threshold whose :func:`abort_probability` stays within ``risk``, and at least 2 (with 1, any
    single neighbour would hold a client's secrets outright) unless the client has one neighbour."""
    best = min(2, k)
    for t in range(best + 1, k + 1):
        if abort_probability(n, k, t, dropout) <= risk:
            best = t
    return best


def neighbour_graph(params: SecAggParams) -> dict[int, tuple[int, ...]]:
    """Each client's neighbours: the clients on a ring in a seeded random order, ``neighbours / 2`` on each
    side (every other client when ``neighbours`` = n - 1). Symmetric."""
    ids = list(params.clients)
    n, k = len(ids), params.neighbours
    if k >= n - 1:
        return {c: tuple(d for d in ids if d != c) for c in ids}
    order = [ids[i] for i in np.random.default_rng([params.graph_seed, params.round]).permutation(n)]
    where = {c: i for i, c in enumerate(order)}
    out = {}
    for c in ids:
        i = where[c]
        out[c] = tuple(sorted(order[(i + d) % n] for d in range(-k // 2, k // 2 + 1) if d))
    return out


# --------------------------------------------------------------------------------------------- primitives
_ZEROS: dict[int, bytes] = {}


def prg(seed: bytes, n: int, out: bytearray | None = None) -> np.ndarray:
    """``n`` uint32 words of the ChaCha20 keystream under the 32-byte ``seed`` (zero nonce: each seed is used
    once). ``out`` (4 n bytes) is reused when given: the returned view is only valid until its next use."""
    zeros = _ZEROS.get(4 * n)
    if zeros is None:
        zeros = _ZEROS[4 * n] = bytes(4 * n)
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    if out is None:
        return np.frombuffer(enc.update(zeros), dtype="<u4")
    enc.update_into(zeros, out)
    return np.frombuffer(out, dtype="<u4", count=n)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _pair_info(kind: bytes, round_: int, a: int, b: int) -> bytes:
    lo, hi = min(a, b), max(a, b)
    return b"edgeray-secagg " + kind + struct.pack(">QQQ", round_, lo, hi)


def _commit(round_: int, cid: int, seed: bytes) -> bytes:
    return hashlib.sha256(b"edgeray-secagg commit" + struct.pack(">QQ", round_, cid) + seed).digest()


def shamir_split(secret: bytes, xs: list[int], t: int) -> list[int]:
    """Shares of ``secret`` at the points ``xs`` (distinct, nonzero) over :data:`PRIME`: a random polynomial of
    degree ``t - 1`` whose constant term is the secret, so any ``t`` shares rebuild it and fewer say nothing."""
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out.append(y)
    return out


def shamir_join(points: list[tuple[int, int]], length: int = 32) -> bytes:
    """Lagrange interpolation at 0 of (x, y) points over :data:`PRIME`."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    if total >= 1 << (8 * length):
        raise SecAggError("secagg: the shares do not rebuild a secret (inconsistent shares)")
    return total.to_bytes(length, "big")


# ----------------------------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class Advert:
    cid: int
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class SealedShares:
    """Client ``src``'s shares for neighbour ``dst``, readable only by ``dst``."""

    src: int
    dst: int
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class Reveal:
    """What client ``src`` reveals at unmasking: for each neighbour, one share (of ``b`` or of the mask key)."""

    src: int
    b_shares: dict[int, tuple[int, int]]
    """neighbour -> (x, y) share of that survivor's self-mask seed."""
    s_shares: dict[int, tuple[int, int]]
    """neighbour -> (x, y) share of that dropped client's mask private key."""


# ----------------------------------------------------------------------------------------------- client
@dataclass
class SecAggClient:
    """One client's side of one round."""

    cid: int
    params: SecAggParams
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _b: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    _peers: dict[int, Advert] = field(default_factory=dict, repr=False)
    _held: dict[int, SealedShares] = field(default_factory=dict, repr=False)
    _masked: bool = False

    def __post_init__(self) -> None:
        if self.cid not in self.params.clients:
            raise SecAggError(f"secagg: client {self.cid} is not among round {self.params.round}'s clients")
        self.neighbours = neighbour_graph(self.params)[self.cid]
        self.x = {c: i + 1 for i, c in enumerate(self.params.clients)}  # Shamir x-coordinate of each client

    def advertise(self) -> Advert:
        return Advert(
            self.cid,
            self._c.public_key().public_bytes(_RAW, _PUB),
            self._s.public_key().public_bytes(_RAW, _PUB),
        )

    def _share_key(self, peer: int) -> bytes:
        pk = X25519PublicKey.from_public_bytes(self._peers[peer].c_pk)
        return _hkdf(self._c.exchange(pk), _pair_info(b"share", self.params.round, self.cid, peer))

    def _aad(self, src: int, dst: int) -> bytes:
        return struct.pack(">QQQ", self.params.round, src, dst)

    def share_keys(self, adverts: dict[int, Advert]) -> tuple[bytes, list[SealedShares]]:
        """Given the neighbours' adverts: (commitment to ``b``, the sealed shares for each neighbour)."""
        missing = [j for j in self.neighbours if j not in adverts]
        if missing:
            raise SecAggError(f"secagg: client {self.cid} has no advertised keys for neighbours {missing}")
        self._peers = {j: adverts[j] for j in self.neighbours}
        t = self.params.threshold
        xs = [self.x[j] for j in self.neighbours] + [self.x[self.cid]]
        b_poly = shamir_split(self._b, xs, t)
        s_poly = shamir_split(self._s.private_bytes(_RAW, _PRIV, _NOENC), xs, t)
        self._own_b = b_poly.pop()  # its own share of its seed: revealed if it survives (the seed is then
        s_poly.pop()  # removed anyway); its own share of its mask key is never revealed, so it is not kept
        sealed = []
        for j, b_y, s_y in zip(self.neighbours, b_poly, s_poly, strict=True):
            nonce = secrets.token_bytes(12)
            plain = b_y.to_bytes(66, "big") + s_y.to_bytes(66, "big")
            ct = ChaCha20Poly1305(self._share_key(j)).encrypt(nonce, plain, self._aad(self.cid, j))
            sealed.append(SealedShares(self.cid, j, nonce, ct))
        return _commit(self.params.round, self.cid, self._b), sealed

    def receive(self, sealed: list[SealedShares]) -> None:
        """Keep the sealed shares the neighbours sent this client (opened only at unmasking)."""
        for m in sealed:
            if m.dst != self.cid or m.src not in self._peers:
                raise SecAggError(f"secagg: client {self.cid} got shares from {m.src} meant for {m.dst}")
            self._held[m.src] = m

    def masked_input(self, q: np.ndarray) -> np.ndarray:
        """``q`` (uint32, the quantised update) plus the self mask and the pair masks, mod 2^32."""
        q = np.asarray(q)
        if q.dtype != np.uint32 or q.shape != (self.params.vector_len,):
            raise SecAggError(
                f"secagg: client {self.cid}'s input is {q.dtype}{list(q.shape)}; "
                f"expected uint32[{self.params.vector_len}] (see quantize)"
            )
        buf = bytearray(4 * q.size + 63)  # update_into wants room for a block beyond the data
        y = q + prg(self._b, q.size, buf)
        for j in self.neighbours:
            if j not in self._held:
                continue  # it did not share its keys: the server could not take this pair's mask back out
            mask = prg(self.pair_seed(j), q.size, buf)
            if self.cid < j:
                y += mask
            else:
                y -= mask
        self._masked = True
        return y

    def pair_seed(self, peer: int) -> bytes:
        pk = X25519PublicKey.from_public_bytes(self._peers[peer].s_pk)
        return _hkdf(self._s.exchange(pk), _pair_info(b"mask", self.params.round, self.cid, peer))

    def unmask(self, survivors: set[int], dropped: set[int]) -> Reveal:
        """Open the neighbours' sealed shares and reveal, per neighbour, the share the server may have."""
        if not self._masked:
            raise SecAggError(f"secagg: client {self.cid} was asked to unmask before it sent its input")
        both = survivors & dropped
        if both:
            raise SecAggError(f"secagg: clients {sorted(both)} are named both survivors and dropped")
        b_shares: dict[int, tuple[int, int]] = {}
        s_shares: dict[int, tuple[int, int]] = {}
        if self.cid in survivors:
            b_shares[self.cid] = (self.x[self.cid], self._own_b)
        for j in self.neighbours:
            if j not in survivors and j not in dropped:
                continue  # it never shared keys this round
            m = self._held.get(j)
            if m is None:
                continue
            try:
                plain = ChaCha20Poly1305(self._share_key(j)).decrypt(
                    m.nonce, m.ciphertext, self._aad(j, self.cid)
                )
            except InvalidTag:
                raise SecAggError(
                    f"secagg: round {self.params.round}: the shares client {j} sent client {self.cid} failed "
                    "authentication (tampered with, or misrouted)"
                ) from None
            share = (self.x[self.cid], int.from_bytes(plain[:66] if j in survivors else plain[66:], "big"))
            (b_shares if j in survivors else s_shares)[j] = share
        return Reveal(self.cid, b_shares, s_shares)


# ----------------------------------------------------------------------------------------------- server
class SecAggServer:
    """The server's side of one round: it routes keys and sealed shares, sums masked vectors and unmasks the
    sum. It never holds an unmasked individual update (only masked vectors, then the running sum)."""

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self.graph = neighbour_graph(params)
        self.adverts: dict[int, Advert] = {}
        self.commitments: dict[int, bytes] = {}
        self.sharers: set[int] = set()
        self._outbox: dict[int, list[SealedShares]] = {}
        self._sum = np.zeros(params.vector_len, dtype=np.uint32)
        self.inputs: set[int] = set()

    def collect_adverts(self, adverts: Iterable[Advert]) -> dict[int, dict[int, Advert]]:
        """Each client's neighbours' adverts, to send to it."""
        for a in adverts:
            self.adverts[a.cid] = a
        return {c: {j: self.adverts[j] for j in self.graph[c] if j in self.adverts} for c in self.adverts}

    def collect_shares(self, cid: int, commitment: bytes, sealed: list[SealedShares]) -> None:
        self.commitments[cid] = commitment
        self.sharers.add(cid)
        for m in sealed:
            self._outbox.setdefault(m.dst, []).append(m)

    def sealed_for(self, cid: int) -> list[SealedShares]:
        return list(self._outbox.get(cid, []))

    def add_input(self, cid: int, y: np.ndarray) -> None:
        """A masked vector: summed at once (mod 2^32), not kept."""
        self.add_sum([cid], y)

    def add_sum(self, cids: Iterable[int], y: np.ndarray) -> None:
        """The sum (mod 2^32) of the masked vectors of ``cids``, added up on the way (an aggregator between
        the clients and the server: sums of masked vectors are masked too, and the masks still cancel)."""
        cids = list(cids)
        unknown = [c for c in cids if c not in self.sharers]
        if unknown:
            raise SecAggError(f"secagg: clients {unknown} sent inputs without having shared their keys")
        twice = [c for c in cids if c in self.inputs] + [c for c in set(cids) if cids.count(c) > 1]
        if twice:
            raise SecAggError(
                f"secagg: clients {sorted(set(twice))} sent two inputs in round {self.params.round}"
            )
        self._sum += y
        self.inputs.update(cids)

    def roster(self) -> tuple[set[int], set[int]]:
        """(survivors: sent an input, dropped: shared keys but sent no input)."""
        return set(self.inputs), self.sharers - self.inputs

    def unmask(self, reveals: Iterable[Reveal]) -> np.ndarray:
        """The exact sum of the survivors' inputs mod 2^32, from the reveals of the clients still there."""
        survivors, dropped = self.roster()
        t, r = self.params.threshold, self.params.round
        b_points: dict[int, list[tuple[int, int]]] = {c: [] for c in survivors}
        s_points: dict[int, list[tuple[int, int]]] = {c: [] for c in dropped}
        for rev in reveals:
            if rev.src not in survivors:
                continue  # a client that dropped before sending its input does not help unmask
            for j, share in rev.b_shares.items():
                if j in b_points and (rev.src in self.graph[j] or rev.src == j):
                    b_points[j].append(share)
            for j, share in rev.s_shares.items():
                if j in s_points and rev.src in self.graph[j]:
                    s_points[j].append(share)
        short = {c: len(p) for c, p in {**b_points, **s_points}.items() if len(p) < t}
        if short:
            worst = sorted(short.items(), key=lambda kv: kv[1])[:5]
            raise SecAggAbort(
                f"secagg: round {r} aborted: {len(short)} client(s) have fewer than threshold {t} shares from "
                f"surviving neighbours (e.g. client {worst[0][0]}: {worst[0][1]}); "
                f"{len(survivors)} survivors, {len(dropped)} dropped after sharing keys"
            )
        total = self._sum.copy()
        n = self.params.vector_len
        buf = bytearray(4 * n + 63)
        for c, pts in b_points.items():
            b = shamir_join(pts[:t])
            if _commit(r, c, b) != self.commitments[c]:
                raise SecAggError(
                    f"secagg: round {r}: client {c}'s rebuilt self-mask seed fails its commitment "
                    "(a neighbour revealed a wrong share)"
                )
            total -= prg(b, n, buf)
        for d, pts in s_points.items():
            sk = X25519PrivateKey.from_private_bytes(shamir_join(pts[:t]))
            if sk.public_key().public_bytes(_RAW, _PUB) != self.adverts[d].s_pk:
                raise SecAggError(
                    f"secagg: round {r}: dropped client {d}'s rebuilt mask key does not match "
                    "its advertised public key (a neighbour revealed a wrong share)"
                )
            for j in self.graph[d]:
                if j not in survivors:
                    continue
                seed = _hkdf(
                    sk.exchange(X25519PublicKey.from_public_bytes(self.adverts[j].s_pk)),
                    _pair_info(b"mask", r, d, j),
                )
                mask = prg(seed, n, buf)
                if j < d:  # j added it (j < d), so take it back; else j subtracted it
                    total -= mask
                else:
                    total += mask
        return total


def run_round(
    server: SecAggServer,
    clients: dict[int, SecAggClient],
    inputs: dict[int, np.ndarray],
    *,
    drop_before_sharing: Iterable[int] = (),
    drop_after_masking: Iterable[int] = (),
) -> np.ndarray:
    """Drive one round in this process (the message order of the module docstring): the reference the
    federated strategy's fabric messages follow. Clients in ``drop_before_sharing`` vanish after advertising,
    those in ``drop_after_masking`` after sharing keys (their inputs never arrive, nor their reveals)."""
    early, late = set(drop_before_sharing), set(drop_after_masking)
    adverts = server.collect_adverts(c.advertise() for c in clients.values())
    for cid, c in clients.items():
        if cid in early:
            continue
        commitment, sealed = c.share_keys(adverts[cid])
        server.collect_shares(cid, commitment, sealed)
    for cid, c in clients.items():
        if cid not in early:
            c.receive(server.sealed_for(cid))
    for cid, c in clients.items():
        if cid not in early and cid not in late:
            server.add_input(cid, c.masked_input(inputs[cid]))
    survivors, dropped = server.roster()
    return server.unmask(clients[c].unmask(survivors, dropped) for c in sorted(survivors))


# ------------------------------------------------------------------------------------------ quantisation
def levels_for(clients: int) -> int:
    """Integer levels per coordinate such that ``clients`` quantised vectors sum below 2^32."""
    return (MOD - 1) // clients


def quantize(
    update: np.ndarray, clip: float, clients: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Clip ``update`` to L2 norm ``clip`` and round it stochastically (unbiased) onto ``levels_for(clients)``
    levels spanning [-clip, clip]: (uint32 vector, the clipping factor applied)."""
    x = np.asarray(update, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return quantize_bounded(x * factor, clip, clients, rng), factor


def quantize_bounded(values: np.ndarray, bound: float, clients: int, rng: np.random.Generator) -> np.ndarray:
    """``values`` clamped to [-bound, bound] and rounded stochastically (unbiased inside the range) onto
    ``levels_for(clients)`` levels spanning it: a uint32 vector, ``clients`` of which sum without overflow."""
    if not bound > 0:
        raise SecAggError(f"secagg: quantisation bound = {bound}: must be > 0")
    top = levels_for(clients)
    scaled = (np.clip(np.asarray(values, dtype=np.float64), -bound, bound) + bound) * (top / (2 * bound))
    low = np.floor(scaled)
    q = low + (rng.random(scaled.shape) < (scaled - low))
    return np.clip(q, 0, top).astype(np.uint32)


def dequantize(total: np.ndarray, clip: float, clients: int, summed: int) -> np.ndarray:
    """The float sum of ``summed`` clients' quantised vectors from their integer sum (``clip``: the range's
    bound, ``clients``: what the levels were chosen for)."""
    top = levels_for(clients)
    return total.astype(np.float64) * (2 * clip / top) - summed * clip

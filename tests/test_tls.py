"""`edgeray up --tls`: Ray's gRPC over mutual TLS with a CA per cluster and a certificate per raylet.

A cluster of its own (the shared one is plain): its keys are private and every certificate chains to its
CA; a client without the certificates is refused (a plain TCP client, a TLS client without a certificate,
a Ray driver without the TLS settings), one with them is served; `ray job submit` of the main job places an
actor per region and trains the pipeline across the nodes (Ray's channels under TLS, the fabric beside
them); `edgeray rotate` issues new credentials and the old ones are refused. Clients run in child
processes: this test process may already be a driver of the shared plain cluster."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from edgeray import cluster
from edgeray.topology import load_topology

from .conftest import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TOPO = """\
name: tls-tiny
regions:
  - name: eu
    tier: regional
    nodes: [{name: eu-1, cpus: 2, memory_gb: 2}]
  - name: us
    tier: micro
    nodes: [{name: us-1, cpus: 2, memory_gb: 2}]
links:
  - {between: [eu, us], latency_ms: 5}
"""
NAME = "t-tls"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture(scope="module")
def secured(edgeray_home, tmp_path_factory):
    path = tmp_path_factory.mktemp("topo") / "tls.yaml"
    path.write_text(TOPO)
    topo = load_topology(path)
    state = cluster.up(topo, name=NAME, tls=True)
    yield topo, state
    cluster.down(NAME)


def _answer(address: str, ca: Path | None, cert: Path | None = None, key: Path | None = None) -> bytes:
    """What the GCS answers an HTTP/2 (gRPC) preface with: over TLS with ``ca`` (and a client certificate),
    or over plain TCP when ``ca`` is None. Empty, or an exception's name, when it refuses."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            conn: socket.socket = raw
            if ca is not None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_verify_locations(ca)
                if cert is not None:
                    ctx.load_cert_chain(cert, key)
                ctx.set_alpn_protocols(["h2"])
                conn = ctx.wrap_socket(raw, server_hostname=host)
            conn.settimeout(5)
            conn.sendall(H2_PREFACE)
            return conn.recv(64)
    except (OSError, ssl.SSLError) as exc:
        return type(exc).__name__.encode()


def _is_http2_settings(reply: bytes) -> bool:
    """The server's first HTTP/2 frame: a SETTINGS frame (type 4) on stream 0."""
    return len(reply) >= 9 and reply[3] == 4 and reply[5:9] == b"\0\0\0\0"


def test_keys_are_private_and_every_certificate_chains_to_the_cluster_ca(secured):
    topo, state = secured
    tls_dir = Path(state.tls_dir)
    ca = x509.load_pem_x509_certificate((tls_dir / "ca.crt").read_bytes())
    names = {"head", "client", *topo.nodes}
    assert {p.stem for p in (tls_dir / "nodes").glob("*.crt")} == names
    for key in [tls_dir / "ca.key", *(tls_dir / "nodes").glob("*.key")]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for name in names:
        cert = x509.load_pem_x509_certificate((tls_dir / "nodes" / f"{name}.crt").read_bytes())
        pub = ca.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        assert cert.subject.rfc4514_string() == f"CN={name}"
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert str(state.address.rsplit(":", 1)[0]) in {
            str(ip) for ip in sans.get_values_for_type(x509.IPAddress)
        }


def test_only_a_client_with_the_cluster_s_certificate_is_served(secured):
    _, state = secured
    d = Path(state.tls_dir)
    client = (d / "nodes" / "client.crt", d / "nodes" / "client.key")
    assert _is_http2_settings(_answer(state.address, d / "ca.crt", *client))
    assert not _is_http2_settings(_answer(state.address, None))  # plain TCP, as a plain gRPC client speaks
    assert not _is_http2_settings(_answer(state.address, d / "ca.crt"))  # TLS without a client certificate
    # a Ray driver: with `edgeray env`'s settings it lists the nodes; without the TLS ones it is refused
    nodes = cluster.probe_nodes(state.address, state.env(), timeout_s=60)
    assert len([n for n in nodes if n["alive"]]) == 3
    plain = {k: v for k, v in state.env().items() if not k.startswith(("RAY_USE_TLS", "RAY_TLS_"))}
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("RAY_USE_TLS", "RAY_TLS_"))}
    try:
        with pytest.raises(cluster.ClusterError, match="TLS settings"):
            cluster.probe_nodes(state.address, plain, timeout_s=20)
    finally:
        os.environ.update(saved)


def test_ray_job_submit_places_and_trains_across_the_tls_cluster(secured, tmp_path):
    """The main job, as a user submits it after `eval "$(edgeray env)"`: one actor per region and three
    pipeline steps whose stages talk over the fabric."""
    topo, state = secured
    out = tmp_path / "run"
    env = {**os.environ, **state.env()}
    job = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--", sys.executable, "-m", "edgeray.demo",
         "--topology", str(topo.path), "--train-steps", "3", "--out", str(out), "--json", str(tmp_path / "r.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert {(p["wanted"], p["region"]) for p in result["placement"]} == {("eu", "eu"), ("us", "us")}
    summary = result["training"]
    assert summary["steps"] == 3 and summary["final_loss"] < summary["initial_loss"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_rotate_issues_new_credentials_and_the_old_ones_are_refused(secured, tmp_path):
    topo, state = secured
    old = tmp_path / "old"
    shutil.copytree(state.tls_dir, old)
    old_token = Path(state.token_path).read_text()
    new = cluster.rotate(NAME)
    d = Path(new.tls_dir)
    assert Path(new.token_path).read_text() != old_token
    client = (d / "nodes" / "client.crt", d / "nodes" / "client.key")
    assert _is_http2_settings(_answer(new.address, d / "ca.crt", *client))
    # the old client certificate is refused, and the old CA does not vouch for the new servers
    assert not _is_http2_settings(
        _answer(new.address, d / "ca.crt", old / "nodes" / "client.crt", old / "nodes" / "client.key")
    )
    assert _answer(
        new.address, old / "ca.crt", old / "nodes" / "client.crt", old / "nodes" / "client.key"
    ) in (b"SSLCertVerificationError", b"SSLError")
    nodes = cluster.probe_nodes(new.address, new.env(), timeout_s=60)
    assert {n["labels"].get("edgeray.io/node") for n in nodes if n["alive"]} >= set(topo.nodes)

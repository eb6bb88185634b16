"""Manifests for real multi-region clusters: the launcher YAML against Ray's bundled schema, the KubeRay
RayCluster's labels against the topology."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from edgeray.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "clusters" / "deploy"
TOPOLOGY = load_topology(ROOT / "clusters" / "continental.yaml")


def test_launcher_yaml_validates_against_rays_bundled_schema():
    config = yaml.safe_load((DEPLOY / "continental-launcher.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # Ray's own check, with its defaults filled in


def test_launcher_has_one_labelled_node_type_per_region():
    config = yaml.safe_load((DEPLOY / "continental-launcher.yaml").read_text())
    types = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert len(types) == len(TOPOLOGY.regions)
    for region in TOPOLOGY.regions.values():
        spec = types[f"region-{region.name}"]
        assert spec["labels"]["edgeray.io/region"] == region.name
        assert spec["labels"]["edgeray.io/tier"] == region.tier.value
        assert spec["min_workers"] == spec["max_workers"] == len(region.nodes)


def test_kuberay_worker_groups_carry_the_topology_labels():
    manifest = yaml.safe_load((DEPLOY / "continental-kuberay.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    groups = {g["groupName"]: g for g in manifest["spec"]["workerGroupSpecs"]}
    assert set(groups) == set(TOPOLOGY.regions)
    for region in TOPOLOGY.regions.values():
        group = groups[region.name]
        assert group["replicas"] == len(region.nodes)
        # Every label in the group must be one each topology node of the region carries.
        for node in region.nodes:
            for key, value in group["labels"].items():
                assert node.labels[key] == value, (region.name, key)
        assert group["labels"]["edgeray.io/region"] == region.name
        assert group["template"]["spec"]["nodeSelector"]["edgeray.io/region"] == region.name


def test_both_manifests_turn_token_auth_on():
    """A head the export opens on 0.0.0.0 must not take jobs from anyone who reaches it."""
    config = yaml.safe_load((DEPLOY / "continental-launcher.yaml").read_text())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token on every node
    manifest = yaml.safe_load((DEPLOY / "continental-kuberay.yaml").read_text())
    assert manifest["spec"]["authOptions"] == {"mode": "token"}


def test_the_committed_manifests_are_what_export_writes():
    from edgeray import deploy

    assert (DEPLOY / "continental-launcher.yaml").read_text() == deploy.to_yaml(
        deploy.launcher_config(TOPOLOGY), TOPOLOGY, "launcher"
    )
    assert (DEPLOY / "continental-kuberay.yaml").read_text() == deploy.to_yaml(
        deploy.kuberay_manifest(TOPOLOGY), TOPOLOGY, "kuberay"
    )


def test_both_manifests_turn_mutual_tls_on_with_a_certificate_each_node_signs_itself():
    from edgeray.deploy import CA_DIR, NODE_CERT_SCRIPT, TLS_ENV

    config = yaml.safe_load((DEPLOY / "continental-launcher.yaml").read_text())
    starts = [
        c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c
    ]
    assert starts and all(f"{k}={v}" in c for c in starts for k, v in TLS_ENV.items())
    assert config["file_mounts"]["/tmp/edgeray-ca"] == f"~/.edgeray/tls/{TOPOLOGY.name}"
    assert any(NODE_CERT_SCRIPT in c for c in config["setup_commands"])
    manifest = yaml.safe_load((DEPLOY / "continental-kuberay.yaml").read_text())
    pods = [manifest["spec"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in manifest["spec"]["workerGroupSpecs"]
    ]
    for pod in pods:
        (init,) = pod["initContainers"]
        assert init["command"][:3] == ["sh", "-c", NODE_CERT_SCRIPT]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["ca"]["secret"]["secretName"] == f"edgeray-{TOPOLOGY.name}-ca"
        for c in pod["containers"]:
            assert {e["name"]: e["value"] for e in c["env"]} == TLS_ENV
            assert {m["mountPath"] for m in c["volumeMounts"]} >= {CA_DIR}


def test_a_node_certificate_from_the_script_completes_mutual_tls_with_a_driver_certificate(tmp_path):
    """What a node's init step makes (openssl, NODE_CERT_SCRIPT) under the CA `edgeray export tls-ca` writes
    (edgeray.tls): Python's ssl module, as server with the node's certificate and as client with the
    driver's, completes a mutual-TLS handshake; a client certificate from another CA is refused."""
    import os
    import socket
    import ssl
    import subprocess
    import threading

    from edgeray import tls
    from edgeray.deploy import NODE_CERT_SCRIPT

    ca = tls.issue_ca(tmp_path / "ca", "continental")
    driver = tls.issue_node(tmp_path / "driver", ca, "client", ["127.0.0.1"])
    stranger = tls.issue_node(
        tmp_path / "other", tls.issue_ca(tmp_path / "other-ca", "x"), "client", ["127.0.0.1"]
    )
    env = {**os.environ, "EDGERAY_TLS_DIR": str(tmp_path / "node"), "EDGERAY_CA_DIR": str(tmp_path / "ca")}
    done = subprocess.run(["sh", "-c", NODE_CERT_SCRIPT, "node-cert", "127.0.0.1", "pod-0"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "node" / "tls.key").stat().st_mode & 0o777 == 0o600
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "node" / "tls.crt", tmp_path / "node" / "tls.key")
    server_ctx.load_verify_locations(ca.cert)
    server_ctx.verify_mode = ssl.CERT_REQUIRED

    def handshake(client: tls.Issued) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        seen: list[str] = []

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    seen.append(dict(x[0] for x in s.getpeercert()["subject"])["commonName"])
                    s.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                seen.append(type(exc).__name__)

        t = threading.Thread(target=serve)
        t.start()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(ca.cert)
        ctx.load_cert_chain(client.cert, client.key)
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
            ):
                s.recv(2)
        except (ssl.SSLError, OSError):
            pass
        t.join(10)
        listener.close()
        return seen[0]

    assert handshake(driver) == "client"
    assert handshake(stranger) in ("SSLError", "SSLCertVerificationError")  # the server refuses it

"""Manifests for running a topology on real machines: a Ray cluster-launcher YAML and a KubeRay RayCluster.

    edgeray export launcher clusters/continental.yaml > clusters/deploy/continental-launcher.yaml
    edgeray export kuberay  clusters/continental.yaml > clusters/deploy/continental-kuberay.yaml

Both carry one worker group per region with the region's Ray labels (``edgeray.io/region``,
``edgeray.io/tier`` and ``edgeray.io/accelerator`` when every node of the region shares one), so the same
placement code runs unchanged on the local cluster and on a real one. A group has identical members, so the
per-node label ``edgeray.io/node`` is set only by ``edgeray up`` (locally); on a real cluster pin by region.
The launcher targets AWS in one provider region (edge sites as node types); the KubeRay manifest uses the
group-level ``labels`` field of KubeRay >= 1.5.

Both turn Ray's token auth on: a head reachable on 0.0.0.0 without it runs any job anyone sends. The
launcher's nodes share the token ``ray get-auth-token --generate`` wrote to ``~/.ray/auth_token`` (copied by
``file_mounts``); KubeRay (>= 1.5.1) generates one per cluster (``authOptions: {mode: token}``).

Both also turn Ray's mutual TLS on (``RAY_USE_TLS``). The cluster's CA comes from ``edgeray export tls-ca
TOPOLOGY DIR`` (DIR/ca.crt, DIR/ca.key 0600, and DIR/client.crt/.key for your drivers); each node signs its
own certificate for its address with :data:`NODE_CERT_SCRIPT` (openssl) before Ray starts: the launcher
copies the CA to every node (``file_mounts``), KubeRay mounts it from the Secret ``edgeray-NAME-ca``
(``kubectl create secret generic edgeray-NAME-ca --from-file=DIR/ca.crt --from-file=DIR/ca.key``) into an
init container. Every node can therefore sign certificates: keep that CA for this cluster only, as Ray's
own TLS guide does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from edgeray.topology import ACCELERATOR_LABEL, REGION_LABEL, TIER_LABEL, Region, Tier, Topology

RAY_VERSION = "2.60.0"
RAY_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-cpu"
CLUSTER_LABEL = "edgeray.io/cluster"
# Instance type per tier for the AWS launcher (CPU-only defaults; edit for GPUs).
_INSTANCE = {
    Tier.DEVICE: "t4g.small",
    Tier.MICRO: "m7g.large",
    Tier.REGIONAL: "m7i.xlarge",
    Tier.CLOUD: "m7i.2xlarge",
}


TLS_DIR = "/etc/edgeray/tls"  # where each node keeps its certificate (KubeRay: an emptyDir volume)
CA_DIR = "/etc/edgeray/ca"  # the cluster's CA (KubeRay: the Secret, read-only)
TLS_ENV = {
    "RAY_USE_TLS": "1",
    "RAY_TLS_SERVER_CERT": f"{TLS_DIR}/tls.crt",
    "RAY_TLS_SERVER_KEY": f"{TLS_DIR}/tls.key",
    "RAY_TLS_CA_CERT": f"{CA_DIR}/ca.crt",
}
# A certificate for this node's address (first argument; its name is the second), signed by the CA in
# $EDGERAY_CA_DIR (default CA_DIR) into $EDGERAY_TLS_DIR (default TLS_DIR), usable as gRPC server and
# client; the key is 0600. POSIX sh and openssl (both in Ray's images).
NODE_CERT_SCRIPT = (
    f'set -e; ip="$1"; name="$2"; tls="${{EDGERAY_TLS_DIR:-{TLS_DIR}}}"; ca="${{EDGERAY_CA_DIR:-{CA_DIR}}}"; '
    'mkdir -p "$tls"; umask 077; '
    "openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 "
    '-keyout "$tls/tls.key" -out "$tls/tls.csr" -subj "/CN=$name" 2>/dev/null; '
    'printf "subjectAltName=IP:%s,IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=serverAuth,clientAuth\\n" '
    '"$ip" > "$tls/ext.cnf"; '
    'openssl x509 -req -in "$tls/tls.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -CAcreateserial '
    '-CAserial "$tls/ca.srl" -days 30 -sha256 -extfile "$tls/ext.cnf" -out "$tls/tls.crt" 2>/dev/null; '
    'chmod 600 "$tls/tls.key"; chmod 644 "$tls/tls.crt"'
)


def tls_prefix() -> str:
    """The environment assignments that put a ``ray start`` on mutual TLS."""
    return " ".join(f"{k}={v}" for k, v in TLS_ENV.items())


def region_labels(region: Region) -> dict[str, str]:
    """The Ray labels every node of ``region`` shares."""
    labels = {REGION_LABEL: region.name, TIER_LABEL: region.tier.value}
    accelerators = {n.accelerator for n in region.nodes}
    if len(accelerators) == 1:
        labels[ACCELERATOR_LABEL] = accelerators.pop()
    return labels


def launcher_config(topology: Topology, *, aws_region: str = "eu-central-1") -> dict[str, Any]:
    """A Ray cluster-launcher config (validated by ray's ray-schema.json) for ``topology``."""
    node_types: dict[str, Any] = {
        "head": {
            "resources": {"CPU": 0},
            "labels": {"edgeray.io/role": "head", CLUSTER_LABEL: topology.name},
            "node_config": {"InstanceType": "m7i.large"},
        }
    }
    for region in topology.regions.values():
        count = len(region.nodes)
        node_types[f"region-{region.name}"] = {
            "min_workers": count,
            "max_workers": count,
            "resources": {
                "CPU": min(n.cpus for n in region.nodes),
                "memory": int(min(n.memory_gb for n in region.nodes) * 2**30),
            },
            "labels": {**region_labels(region), "edgeray.io/role": "node", CLUSTER_LABEL: topology.name},
            "node_config": {"InstanceType": _INSTANCE[region.tier]},
        }
    workers = sum(len(r.nodes) for r in topology.regions.values())
    return {
        "cluster_name": f"edgeray-{topology.name}",
        "max_workers": workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": {"type": "aws", "region": aws_region, "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": node_types,
        "head_node_type": "head",
        # Token auth on every node, one token: generate it once with `ray get-auth-token --generate`
        # (it lands in ~/.ray/auth_token, where Ray looks by default); the launcher copies it to each node.
        # Mutual TLS: the CA from `edgeray export tls-ca` (in ~/.edgeray/tls/NAME) goes to every node,
        # which signs its own certificate for its address before Ray starts.
        "file_mounts": {
            "~/.ray/auth_token": "~/.ray/auth_token",
            "/tmp/edgeray-ca": f"~/.edgeray/tls/{topology.name}",
        },
        "setup_commands": [
            f"pip install 'ray[default,serve]=={RAY_VERSION}' 'torch==2.13.0' edgeray",
            "chmod 600 ~/.ray/auth_token",
            f"sudo mkdir -p {CA_DIR} && sudo cp /tmp/edgeray-ca/ca.crt /tmp/edgeray-ca/ca.key {CA_DIR}/ "
            f"&& sudo chown -R $USER {CA_DIR} /etc/edgeray && chmod 600 {CA_DIR}/ca.key",
            f"sh -c '{NODE_CERT_SCRIPT}' node-cert \"$(hostname -I | cut -d' ' -f1)\" \"$(hostname)\"",
        ],
        "head_start_ray_commands": [
            f"RAY_AUTH_MODE=token {tls_prefix()} ray start --head --port=6379 --dashboard-host=0.0.0.0 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": [
            f"RAY_AUTH_MODE=token {tls_prefix()} ray start --address=$RAY_HEAD_IP:6379",
        ],
    }


def kuberay_manifest(topology: Topology, *, image: str = RAY_IMAGE) -> dict[str, Any]:
    """A KubeRay ``RayCluster`` with one worker group per region carrying the region's Ray labels."""

    ca_secret = f"edgeray-{topology.name}-ca"

    def container(name: str, cpus: float, memory_gb: float) -> dict[str, Any]:
        res = {"cpu": str(cpus), "memory": f"{max(1, round(memory_gb))}Gi"}
        return {
            "name": name,
            "image": image,
            "resources": {"requests": res, "limits": dict(res)},
            "env": [{"name": k, "value": v} for k, v in TLS_ENV.items()],
            "volumeMounts": [{"name": "ca", "mountPath": CA_DIR, "readOnly": True},
                             {"name": "tls", "mountPath": TLS_DIR}],
        }  # fmt: skip

    def pod(main: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """A pod whose init container signs this pod's certificate for its IP with the cluster's CA."""
        sign = {
            "name": "node-cert",
            "image": image,
            "command": ["sh", "-c", NODE_CERT_SCRIPT, "node-cert", "$(POD_IP)", "$(POD_NAME)"],
            "env": [
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            "volumeMounts": main["volumeMounts"],
        }
        return {
            **extra,
            "securityContext": {
                "fsGroup": 100
            },  # Ray's images run as ray (gid 100): the CA is group-readable
            "initContainers": [sign],
            "containers": [main],
            "volumes": [
                {"name": "ca", "secret": {"secretName": ca_secret, "defaultMode": 0o440}},
                {"name": "tls", "emptyDir": {}},
            ],
        }

    groups = []
    for region in topology.regions.values():
        count = len(region.nodes)
        cpus = min(n.cpus for n in region.nodes)
        mem = min(n.memory_gb for n in region.nodes)
        groups.append(
            {
                "groupName": region.name,
                "replicas": count,
                "minReplicas": count,
                "maxReplicas": count,
                "labels": region_labels(region),
                "rayStartParams": {"num-cpus": str(cpus)},
                "template": {
                    "metadata": {"labels": {"edgeray.io/region": region.name}},
                    # Put the pods in the region: label your Kubernetes nodes with edgeray.io/region.
                    "spec": pod(
                        container("ray-worker", cpus, mem), nodeSelector={"edgeray.io/region": region.name}
                    ),
                },
            }
        )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": f"edgeray-{topology.name}", "labels": {CLUSTER_LABEL: topology.name}},
        "spec": {
            "rayVersion": RAY_VERSION,
            # KubeRay >= 1.5.1 makes a Secret with a random token and sets RAY_AUTH_MODE=token and
            # RAY_AUTH_TOKEN on every Ray container: the dashboard and jobs API refuse callers without it.
            "authOptions": {"mode": "token"},
            "headGroupSpec": {
                "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                "template": {"spec": pod(container("ray-head", 2, 8))},
            },
            "workerGroupSpecs": groups,
        },
    }


def to_yaml(doc: dict[str, Any], topology: Topology, kind: str) -> str:
    source = f"clusters/{Path(topology.path).name}" if topology.path else topology.name
    header = (
        f"# Generated by `edgeray export {kind} {source}`: edit the topology and regenerate rather than "
        "editing this file.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, width=110)

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
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # one token on every node
    manifest = yaml.safe_load((DEPLOY / "continental-kuberay.yaml").read_text())
    assert manifest["spec"]["authOptions"] == {"mode": "token"}

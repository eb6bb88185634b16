"""Bad topology documents: every one is a TopologyError naming file, field path, value and what is valid.

Includes a property-based fuzz: arbitrary documents never raise anything but TopologyError, and finish fast.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeray.topology import Topology, TopologyError, load_topology, loads_topology

ROOT = Path(__file__).resolve().parents[1]
GOOD = """\
name: t
regions:
  - name: eu
    tier: regional
    nodes:
      - {name: eu-1, cpus: 2, memory_gb: 2}
  - name: us
    tier: micro
    nodes:
      - {name: us-1, cpus: 1, memory_gb: 1}
      - {name: us-2, cpus: 1, memory_gb: 1}
links:
  - {between: [eu, us], latency_ms: 40}
"""


def _error(text: str) -> str:
    with pytest.raises(TopologyError) as info:
        loads_topology(text, path="fleet.yaml")
    return str(info.value)


def _mutate(edit) -> str:
    doc = yaml.safe_load(GOOD)
    edit(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def test_the_base_document_is_valid():
    assert len(loads_topology(GOOD).nodes) == 3


@pytest.mark.parametrize(
    "edit,expected",
    [
        # out-of-range value: the exact field path from the brief
        (
            lambda d: d["regions"][1]["nodes"][0].__setitem__("bandwidth_mbps", -5),
            ["fleet.yaml", "regions[1].nodes[0].bandwidth_mbps", "-5", "greater than 0"],
        ),
        # wrong type
        (
            lambda d: d["regions"][0]["nodes"][0].__setitem__("cpus", "two"),
            ["regions[0].nodes[0].cpus", "'two'", "integer"],
        ),
        # unknown key, with the valid keys listed
        (
            lambda d: d["regions"][0]["nodes"][0].__setitem__("cpu", 2),
            ["regions[0].nodes[0].cpu", "unknown key", "cpus", "memory_gb"],
        ),
        (lambda d: d.__setitem__("region", []), ["region", "unknown key", "regions"]),
        # enum
        (
            lambda d: d["regions"][0].__setitem__("tier", "fog"),
            ["regions[0].tier", "'fog'", "device", "micro", "regional", "cloud"],
        ),
        # loss out of range
        (lambda d: d["links"][0].__setitem__("loss", 1.5), ["links[0].loss", "1.5", "less than 1"]),
        # reference to an unknown region
        (
            lambda d: d["links"][0].__setitem__("between", ["eu", "asia"]),
            ["links[0].between[1]", "'asia'", "unknown region", "['eu', 'us']"],
        ),
        # duplicate names
        (lambda d: d["regions"][1].__setitem__("name", "eu"), ["regions[1].name", "duplicate region"]),
        (
            lambda d: d["regions"][1]["nodes"][1].__setitem__("name", "eu-1"),
            ["regions[1].nodes[1].name", "duplicate node", "regions[0].nodes[0]"],
        ),
        # missing required field
        (lambda d: d["regions"][0].pop("tier"), ["regions[0].tier", "required"]),
        # disconnected fleet
        (lambda d: d.__setitem__("links", []), ["links", "cannot reach", "star, mesh or tree"]),
        # bad name
        (
            lambda d: d["regions"][0].__setitem__("name", "EU West"),
            ["regions[0].name", "'EU West'", "lowercase"],
        ),
        # reserved label keys
        (
            lambda d: d["regions"][0]["nodes"][0].__setitem__("labels", {"edgeray.io/region": "x"}),
            ["labels", "reserved"],
        ),
        # empty lists
        (lambda d: d["regions"][0].__setitem__("nodes", []), ["regions[0].nodes", "at least 1"]),
        # power sanity
        (
            lambda d: d["regions"][0]["nodes"][0].__setitem__("power", {"idle_w": 10, "busy_w": 5}),
            ["power.busy_w", ">= idle_w"],
        ),
        # NaN
        (lambda d: d["links"][0].__setitem__("latency_ms", float("nan")), ["links[0].latency_ms", "finite"]),
    ],
)
def test_invalid_documents_name_field_value_and_rule(edit, expected):
    message = _error(_mutate(edit))
    for part in expected:
        assert part in message, f"{part!r} missing from:\n{message}"


def test_errors_point_at_the_yaml_line():
    text = GOOD.replace("{name: us-2, cpus: 1, memory_gb: 1}", "{name: us-2, cpus: 0, memory_gb: 1}")
    message = _error(text)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "us-2" in ln)
    assert f"line {line}: regions[1].nodes[1].cpus = 0" in message


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", "empty"),
        ("# just a comment\n", "empty"),
        ("- a\n- b\n", "is a list, expected a mapping"),
        ("42", "is a int, expected a mapping"),
        ("name: t\nregions: [\n", "YAML syntax error"),
        ("name: t\n  bad: indent\n", "YAML syntax error"),
        ("name: t\nname: u\nregions: []\n", "duplicate key 'name'"),
        ("name: t\nregions: 5\n", "regions"),
    ],
)
def test_malformed_documents(text, expected):
    message = _error(text)
    assert message.startswith("fleet.yaml")
    assert expected in message


def test_syntax_errors_carry_line_and_column():
    assert "fleet.yaml:3:" in _error("name: t\nregions:\n  - {name: a, tier: ]}\nlinks: []\n")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(TopologyError, match="no such topology file"):
        load_topology(tmp_path / "nope.yaml")
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TopologyError, match=r"bin\.yaml"):
        load_topology(bad)


# ------------------------------------------------------------------------------------------------ fuzz
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["eu", "us", "device", "micro", "cloud", "eu-1", "us-1"]),
)
keys = st.one_of(
    st.sampled_from(
        [
            "name",
            "regions",
            "nodes",
            "tier",
            "links",
            "between",
            "latency_ms",
            "cpus",
            "memory_gb",
            "bandwidth_mbps",
            "loss",
            "churn",
            "power",
            "defaults",
            "labels",
        ]
    ),
    st.text(max_size=8),
)
documents = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(keys, kids, max_size=5)),
    max_leaves=30,
)

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(documents)
def test_fuzz_arbitrary_documents_only_raise_topology_error(doc):
    try:
        Topology.from_dict(doc, path="fuzz.yaml")
    except TopologyError as exc:
        assert str(exc).startswith("fuzz.yaml")


@FUZZ
@given(
    st.lists(st.tuples(st.sampled_from(["regions", "links"]), st.integers(0, 2), keys, scalars), max_size=4)
)
def test_fuzz_mutations_of_a_valid_document(edits):
    doc = yaml.safe_load(GOOD)
    for section, index, key, value in edits:
        items = doc[section]
        target = copy.deepcopy(items[index % len(items)])
        target[key] = value
        items[index % len(items)] = target
    try:
        topo = Topology.from_dict(doc, path="fuzz.yaml")
    except TopologyError:
        return
    for a in topo.nodes:  # whatever validates must answer every query
        for b in topo.nodes:
            assert topo.path_latency_ms(a, b) >= 0


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text(text):
    try:
        loads_topology(text, path="fuzz.yaml")
    except TopologyError as exc:
        assert "fuzz.yaml" in str(exc)

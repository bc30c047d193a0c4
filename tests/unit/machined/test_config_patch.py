"""Strategic merge (Talos semantics) and RFC 6902 JSON patches on multi-document configs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from machined.config import (
    ConfigValidationError,
    JsonPatch,
    MachineConfig,
    PatchError,
    StrategicMergePatch,
    apply_patches,
    load_patch,
)
from machined.config.patch import apply_json_patch, format_pointer, json_equal, parse_pointer, strategic_merge
from machined.config.testing import config_yaml, new_secret

SECRET = new_secret()


def base() -> MachineConfig:
    return MachineConfig.parse(
        config_yaml(
            secret=SECRET,
            agent={"mesh": {"advertisedNetworks": ["10.1.0.0/24"]}},
            services=[
                {"name": "etcd", "command": "/usr/bin/etcd", "args": ["--a"], "env": {"A": "1"}},
                {"name": "app", "command": "/usr/bin/app", "dependsOn": ["etcd"]},
            ],
        )
    )


# --- strategic merge --------------------------------------------------------------------------------


def test_maps_merge_scalars_replace_lists_append():
    cfg = base().patch(
        """\
machine:
  certSANs: [a.example]
cluster:
  clusterName: renamed
---
apiVersion: v1alpha1
kind: AgentConfig
mesh:
  advertisedNetworks: [10.2.0.0/24]
wireguard:
  listenPort: 51999
"""
    )
    assert cfg.v1alpha1.cluster_name == "renamed"
    assert cfg.v1alpha1.cluster_id == "test-cluster"  # untouched sibling
    assert cfg.v1alpha1.cert_sans == ("a.example",)
    assert [str(n) for n in cfg.mesh().advertise] == ["10.1.0.0/24", "10.2.0.0/24"]
    assert cfg.mesh().config.listen_port == 51999


def test_v1alpha1_patch_may_omit_version_or_carry_it():
    a = base().patch("machine:\n  type: controlplane\n")
    b = base().patch("version: v1alpha1\nmachine:\n  type: controlplane\n")
    assert a == b and a.v1alpha1.machine_type == "controlplane"


def test_replace_lists_filters_and_args():
    cfg = base().patch(
        """\
apiVersion: v1alpha1
kind: KubeSpanConfig
filters:
  endpoints: ["10.0.0.0/8"]
---
apiVersion: v1alpha1
kind: KubeSpanConfig
filters:
  endpoints: ["!10.9.0.0/16", "10.0.0.0/8"]
---
apiVersion: v1alpha1
kind: ServiceConfig
name: etcd
args: [--b, --c]
"""
    )
    assert cfg.mesh().endpoint_filters == ("!10.9.0.0/16", "10.0.0.0/8")
    assert cfg.service("etcd").args == ("--b", "--c")  # type: ignore[union-attr]
    assert cfg.service("etcd").environ == {"A": "1"}  # type: ignore[union-attr]


def test_null_leaves_a_value_alone():
    cfg = base().patch("cluster:\n  clusterName: null\n")
    assert cfg.v1alpha1.cluster_name == "test"


def test_delete_a_section_a_key_and_a_document():
    cfg = base().patch(
        """\
cluster:
  clusterName:
    $patch: delete
---
apiVersion: v1alpha1
kind: AgentConfig
mesh:
  $patch: delete
---
apiVersion: v1alpha1
kind: ServiceConfig
name: app
$patch: delete
---
apiVersion: v1alpha1
kind: ServiceConfig
name: etcd
env:
  A:
    $patch: delete
"""
    )
    assert cfg.v1alpha1.cluster_name is None
    assert cfg.mesh().advertise == ()
    assert [s.name for s in cfg.services()] == ["etcd"]
    assert cfg.service("etcd").environ == {}  # type: ignore[union-attr]


def test_deleting_a_missing_key_is_fine_a_missing_document_is_not():
    assert base().patch("machine:\n  nothing:\n    $patch: delete\n") == base()
    with pytest.raises(PatchError, match=r"document 1 \(ServiceConfig\[ghost\]\).*no such document"):
        base().patch("apiVersion: v1alpha1\nkind: ServiceConfig\nname: ghost\n$patch: delete\n")


def test_unmatched_document_is_added():
    cfg = base().patch(
        "apiVersion: v1alpha1\nkind: ServiceConfig\nname: extra\ncommand: /bin/extra\ndependsOn: [app]\n"
    )
    assert [s.name for s in cfg.services()] == ["etcd", "app", "extra"]
    assert cfg.document_kinds()[-1] == "ServiceConfig[extra]"


def test_keyed_lists_merge_by_key_and_delete_items():
    docs = [
        {
            "version": "v1alpha1",
            "machine": {
                "type": "worker",
                "network": {
                    "interfaces": [
                        {"interface": "eth0", "dhcp": True, "vlans": [{"vlanId": 10, "mtu": 1500}]},
                        {"interface": "eth1", "dhcp": False},
                        {"deviceSelector": {"busPath": "0*"}, "dhcp": True},
                    ]
                },
            },
        }
    ]
    patch = load_patch(
        """\
machine:
  network:
    interfaces:
      - interface: eth0
        dhcp: false
        vlans:
          - vlanId: 10
            mtu: 9000
          - vlanId: 20
      - interface: eth1
        $patch: delete
      - deviceSelector: {busPath: "0*"}
        mtu: 1400
      - interface: eth2
"""
    )
    (out,) = apply_patches(docs, [patch])
    ifs = out["machine"]["network"]["interfaces"]
    assert ifs == [
        {"interface": "eth0", "dhcp": False, "vlans": [{"vlanId": 10, "mtu": 9000}, {"vlanId": 20}]},
        {"deviceSelector": {"busPath": "0*"}, "dhcp": True, "mtu": 1400},
        {"interface": "eth2"},
    ]
    assert docs[0]["machine"]["network"]["interfaces"][1] == {
        "interface": "eth1",
        "dhcp": False,
    }  # input untouched


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            "machine:\n  certSANs:\n    - $patch: delete\n",
            "v1alpha1.*machine.certSANs\\[0\\].*matched by a key",
        ),
        (
            "machine:\n  network:\n    interfaces:\n      - dhcp: true\n",
            "machine.network.interfaces\\[0\\].*interface, deviceSelector",
        ),
        ("machine:\n  $patch: replace\n", "machine.\\$patch.*only delete"),
        ("apiVersion: v1alpha1\nname: x\n", "document 1.*version: v1alpha1, or apiVersion and kind"),
    ],
)
def test_strategic_merge_errors_name_document_and_path(patch, message):
    with pytest.raises(PatchError, match=message):
        base().patch(patch)


def test_patch_result_is_validated():
    with pytest.raises(ConfigValidationError) as e:
        base().patch("cluster:\n  secret: c2hvcnQ=\n")
    assert [p.location for p in e.value.problems] == ["v1alpha1.cluster.secret"]
    assert "c2hvcnQ=" not in str(e.value)


# --- JSON patch -------------------------------------------------------------------------------------


def test_json_patch_all_ops_on_v1alpha1():
    cfg = base().patch(
        """\
[
  {"op": "test", "path": "/machine/type", "value": "worker"},
  {"op": "add", "path": "/machine/certSANs", "value": ["b.example"]},
  {"op": "add", "path": "/machine/certSANs/0", "value": "a.example"},
  {"op": "add", "path": "/machine/certSANs/-", "value": "c.example"},
  {"op": "copy", "from": "/cluster/clusterName", "path": "/cluster/extra~1thing"},
  {"op": "move", "from": "/cluster/extra~1thing", "path": "/cluster/moved~0x"},
  {"op": "remove", "path": "/cluster/moved~0x"},
  {"op": "replace", "path": "/cluster/clusterName", "value": "json"}
]"""
    )
    assert cfg.v1alpha1.cert_sans == ("a.example", "b.example", "c.example")
    assert cfg.v1alpha1.cluster_name == "json"
    assert "moved" not in cfg.canonical_yaml() and "extra" not in cfg.canonical_yaml()


def test_json_patch_yaml_form_and_document_selector():
    cfg = base().patch(
        """\
- op: replace
  path: /args/0
  value: --z
  document: ServiceConfig[etcd]
- op: add
  path: /wireguard
  value: {listenPort: 50000}
  document: AgentConfig
"""
    )
    assert cfg.service("etcd").args == ("--z",)  # type: ignore[union-attr]
    assert cfg.mesh().config.listen_port == 50000


@pytest.mark.parametrize(
    ("ops", "index", "fragment"),
    [
        ('[{"op": "remove", "path": "/machine/nope"}]', 0, "/machine/nope does not exist"),
        (
            '[{"op": "test", "path": "/machine/type", "value": "worker"}, {"op": "replace", "path": "/x", "value": 1}]',
            1,
            "/x does not exist",
        ),
        ('[{"op": "add", "path": "/machine/certSANs/5", "value": "x"}]', 0, "does not exist"),
        ('[{"op": "add", "path": "machine", "value": 1}]', 0, "must be empty or start with '/'"),
        ('[{"op": "add", "path": "/a~2b", "value": 1}]', 0, "'~' must be followed by 0 or 1"),
        ('[{"op": "frobnicate", "path": "/a"}]', 0, "unknown op"),
        ('[{"op": "add", "path": "/a"}]', 0, "'value' is required"),
        ('[{"op": "move", "from": "/machine", "path": "/machine/inner"}]', 0, "into one of its own children"),
        ('[{"op": "remove", "path": ""}]', 0, "whole document"),
        (
            '[{"op": "test", "path": "/cluster/secret", "value": "guess"}]',
            0,
            "test failed: the value differs",
        ),
        ('[{"op": "add", "path": "/machine/type/x", "value": 1}]', 0, "is not a mapping or list"),
        (
            '[{"op": "add", "path": "/x", "value": 1, "document": "ServiceConfig[ghost]"}]',
            0,
            "no ServiceConfig[ghost] document",
        ),
        (
            '[{"op": "remove", "path": "/args/01", "document": "ServiceConfig[etcd]"}]',
            0,
            "'01' is not a list index",
        ),
        ('[{"op": "remove", "path": "/args/-", "document": "ServiceConfig[etcd]"}]', 0, "names no element"),
    ],
)
def test_json_patch_errors_name_op_index_and_path(ops, index, fragment):
    with pytest.raises(PatchError) as e:
        base().patch(ops)
    assert e.value.op_index == index
    assert fragment in str(e.value)
    assert f"op[{index}]" in str(e.value)
    assert SECRET not in str(e.value) and "guess" not in str(e.value)


def test_json_patch_is_all_or_nothing():
    docs = base().documents()
    before = copy.deepcopy(docs)
    ops = JsonPatch(
        (
            {"op": "replace", "path": "/cluster/clusterName", "value": "changed"},
            {"op": "remove", "path": "/does/not/exist"},
        )
    )
    with pytest.raises(PatchError):
        apply_patches(docs, [ops])
    assert docs == before


def test_rfc6902_appendix_a_examples():
    # a few of RFC 6902's own examples (appendix A), on plain documents
    assert apply_json_patch({"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}]) == {
        "foo": "bar",
        "baz": "qux",
    }
    assert apply_json_patch({"foo": ["bar", "baz"]}, [{"op": "add", "path": "/foo/1", "value": "qux"}]) == {
        "foo": ["bar", "qux", "baz"]
    }
    assert apply_json_patch({"foo": ["bar", "qux", "baz"]}, [{"op": "remove", "path": "/foo/1"}]) == {
        "foo": ["bar", "baz"]
    }
    assert apply_json_patch(
        {"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}},
        [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}],
    ) == {"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}}
    assert apply_json_patch(
        {"foo": ["all", "grass", "cows", "eat"]}, [{"op": "move", "from": "/foo/1", "path": "/foo/3"}]
    ) == {"foo": ["all", "cows", "eat", "grass"]}
    assert apply_json_patch({"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": 10}]) == {
        "/": 9,
        "~1": 10,
    }
    with pytest.raises(PatchError):
        apply_json_patch({"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": "10"}])
    assert apply_json_patch(
        {"foo": "bar"}, [{"op": "add", "path": "/child", "value": {"grandchild": {}}}]
    ) == {
        "foo": "bar",
        "child": {"grandchild": {}},
    }
    assert apply_json_patch({"foo": ["bar"]}, [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}]) == {
        "foo": ["bar", ["abc", "def"]]
    }


def test_json_equality_rules():
    assert json_equal(1, 1.0)
    assert not json_equal(True, 1)
    assert json_equal({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]})
    assert not json_equal([1, 2], [2, 1])
    assert not json_equal("1", 1)


def test_json_text_is_read_as_json():
    patch = load_patch('[{"op": "add", "path": "/a\\/b", "value": "\\u00e9\\/"}]')
    assert isinstance(patch, JsonPatch)
    assert patch.operations[0]["value"] == "é/" and patch.operations[0]["path"] == "/a/b"
    with pytest.raises(PatchError, match="duplicate key 'op'"):
        load_patch('[{"op": "add", "op": "remove", "path": "/a"}]')


def test_load_patch_detects_kind_and_rejects_nonsense():
    assert isinstance(load_patch("- {op: remove, path: /a}\n"), JsonPatch)
    assert isinstance(load_patch("machine: {}\n---\nkind: X\napiVersion: v1\n"), StrategicMergePatch)
    for bad, msg in [
        ("", "empty"),
        ("[1]\n", "an operation must be a mapping"),
        ("machine: [\n", "YAML error"),
        ("- a\n---\n- b\n", "single list"),
    ]:
        with pytest.raises(PatchError, match=msg):
            load_patch(bad)


# --- properties ------------------------------------------------------------------------------------

keys = st.text(alphabet="ab/~01é-", max_size=5)  # "/" and "~" exercise the pointer escapes
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=4))
json_values = st.recursive(
    scalars.filter(lambda v: v is not None) | st.just(None),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=10,
)
maps_only = st.recursive(
    st.one_of(st.booleans(), st.integers(-5, 5), st.text(max_size=4)),
    lambda children: st.dictionaries(
        st.text(alphabet="abcxyz", min_size=1, max_size=3), children, max_size=3
    ),
    max_leaves=8,
)


@settings(max_examples=50, deadline=None)
@given(st.lists(keys, max_size=5))
def test_pointer_round_trip(tokens):
    assert parse_pointer(format_pointer(tokens)) == tokens


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(keys, json_values, max_size=4), keys, json_values)
def test_add_then_remove_restores_the_document(doc, key, value):
    if key in doc:
        return
    path = format_pointer([key])
    added = apply_json_patch(
        doc, [{"op": "add", "path": path, "value": value}, {"op": "test", "path": path, "value": value}]
    )
    assert apply_json_patch(added, [{"op": "remove", "path": path}]) == doc


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(keys, json_values, min_size=1, max_size=4), keys, st.data())
def test_move_there_and_back_restores_the_document(doc, target, data):
    source = data.draw(st.sampled_from(sorted(doc)))
    if target in doc:
        return
    there = apply_json_patch(
        doc, [{"op": "move", "from": format_pointer([source]), "path": format_pointer([target])}]
    )
    back = apply_json_patch(
        there, [{"op": "move", "from": format_pointer([target]), "path": format_pointer([source])}]
    )
    assert back == doc


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(keys, json_values, min_size=1, max_size=4), st.data())
def test_copy_then_test_succeeds(doc, data):
    source = data.draw(st.sampled_from(sorted(doc)))
    out = apply_json_patch(doc, [{"op": "copy", "from": format_pointer([source]), "path": "/copied~1here"}])
    apply_json_patch(out, [{"op": "test", "path": "/copied~1here", "value": doc[source]}])


def _sm(doc: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    (out,) = strategic_merge(
        [{"apiVersion": "v1alpha1", "kind": "X", **doc}],
        StrategicMergePatch(({"apiVersion": "v1alpha1", "kind": "X", **patch},)),
    )
    return out


@settings(max_examples=40, deadline=None)
@given(maps_only, maps_only)
def test_map_merge_is_idempotent_and_keeps_every_patch_leaf(doc, patch):
    if not isinstance(doc, dict) or not isinstance(patch, dict):
        return
    once = _sm(doc, patch)
    assert _sm(once, patch) == once

    def leaves(d: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
        if isinstance(d, dict) and d:
            out: dict[tuple[str, ...], Any] = {}
            for k, v in d.items():
                out.update(leaves(v, (*path, k)))
            return out
        return {path: d}

    got = leaves(once)
    for path, value in leaves(patch).items():
        if value != {}:
            assert got[path] == value


@settings(max_examples=20, deadline=None)
@given(maps_only)
def test_empty_patch_is_identity(doc):
    if isinstance(doc, dict):
        assert _sm(doc, {}) == {"apiVersion": "v1alpha1", "kind": "X", **doc}

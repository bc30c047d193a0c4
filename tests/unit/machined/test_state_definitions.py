"""Resource definitions: Talos names and namespaces, generated aliases, resolution, print columns."""

from __future__ import annotations

import pytest
import yaml

from machined.state import (
    DEFINITIONS,
    MESH_DEFINITIONS,
    META_NAMESPACE,
    RESOURCE_DEFINITION_TYPE,
    AmbiguousTypeError,
    DefinitionError,
    EventType,
    PrintColumn,
    ResourceDefinition,
    State,
    UnknownTypeError,
    resolve_type,
    singularize,
)
from machined.state import catalog as c


def test_mesh_types_in_talos_names_namespaces_and_sensitivity():
    table = {d.type: (d.default_namespace, d.sensitive) for d in MESH_DEFINITIONS}
    assert table == {
        "KubeSpanConfigs.kubespan.talos.dev": ("config", True),
        "KubeSpanIdentities.kubespan.talos.dev": ("kubespan", True),
        "KubeSpanNATStatuses.kubespan.talos.dev": ("kubespan", False),  # ours: endpoint discovery
        "KubeSpanPeerSpecs.kubespan.talos.dev": ("kubespan", False),
        "KubeSpanPeerStatuses.kubespan.talos.dev": ("kubespan", False),
        "KubeSpanEndpoints.kubespan.talos.dev": ("kubespan", False),
        "Affiliates.cluster.talos.dev": ("cluster", False),
        "Identities.cluster.talos.dev": ("cluster", False),
        "Members.cluster.talos.dev": ("cluster", False),
        "LinkStatuses.net.talos.dev": ("network", False),
        "AddressStatuses.net.talos.dev": ("network", False),
        "RouteStatuses.net.talos.dev": ("network", False),
        "NodeAddresses.net.talos.dev": ("network", False),
        "Services.v1alpha1.talos.dev": ("runtime", False),
        "MachineStatuses.runtime.talos.dev": ("runtime", False),
        "MachineConfigs.config.talos.dev": ("config", True),
    }


def test_generated_aliases_follow_talos():
    d = resolve_type("KubeSpanPeerStatuses.kubespan.talos.dev")
    assert d.id == "kubespanpeerstatuses.kubespan.talos.dev"
    assert d.singular == "KubeSpanPeerStatus" and d.display_type == "KubeSpanPeerStatuses"
    assert d.all_aliases == (
        "kubespanpeerstatus",
        "kubespanpeerstatuses",
        "kubespanpeerstatuses.kubespan",
        "kubespanpeerstatuses.kubespan.talos",
        "ksps",
    )
    links = resolve_type("links")
    assert links.all_aliases[:2] == ("link", "links") and "ls" in links.all_aliases


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("kubespanpeerstatuses", c.KUBESPAN_PEER_STATUS),
        ("KubeSpanPeerStatus", c.KUBESPAN_PEER_STATUS),
        ("KUBESPANPEERSTATUSES.KUBESPAN", c.KUBESPAN_PEER_STATUS),
        ("kubespanpeerstatuses.kubespan.talos.dev", c.KUBESPAN_PEER_STATUS),
        ("kubespanidentities", c.KUBESPAN_IDENTITY),
        ("ksi", c.KUBESPAN_IDENTITY),
        ("member", c.MEMBER),
        ("links", c.LINK_STATUS),
        ("addresses", c.ADDRESS_STATUS),
        ("routes", c.ROUTE_STATUS),
        ("nodeaddresses", c.NODE_ADDRESS),
        ("mc", c.MACHINE_CONFIG),
        ("ms", c.MACHINE_STATUS),
        ("services", c.SERVICE),
        ("rd", RESOURCE_DEFINITION_TYPE),
    ],
)
def test_resolution_is_case_insensitive_over_id_and_aliases(arg, expected):
    assert resolve_type(arg).type == expected


def test_resolution_errors():
    with pytest.raises(UnknownTypeError, match='resource "nosuchthing" is not registered'):
        resolve_type("nosuchthing")
    with pytest.raises(
        AmbiguousTypeError, match=r'"ksps" is ambiguous: KubeSpanPeerSpecs\.\S+, KubeSpanPeerStatuses'
    ):
        resolve_type("ksps")
    with pytest.raises(UnknownTypeError):
        resolve_type("")
    with pytest.raises(UnknownTypeError):  # a group prefix alone is not a type
        resolve_type("kubespan")


@pytest.mark.parametrize("bad", ["lowercase.talos.dev", "NoGroup", "Things.Bad.Group", "Things."])
def test_malformed_definitions_are_rejected(bad):
    with pytest.raises(DefinitionError, match="type must be"):
        ResourceDefinition(bad, "ns")


@pytest.mark.parametrize(
    ("plural", "singular"),
    [
        ("KubeSpanIdentities", "KubeSpanIdentity"),
        ("NodeAddresses", "NodeAddress"),
        ("MachineStatuses", "MachineStatus"),
        ("Services", "Service"),
        ("Affiliates", "Affiliate"),
        ("Boxes", "Box"),
    ],
)
def test_singularize(plural, singular):
    assert singularize(plural) == singular


def test_print_columns_render_peer_status():
    d = resolve_type("kubespanpeerstatuses")
    assert [col.name.upper() for col in d.print_columns] == ["LABEL", "ENDPOINT", "STATE", "RX", "TX"]
    spec = {
        "label": "node-1",
        "endpoint": "1.2.3.4:51820",
        "state": "up",
        "receiveBytes": 10,
        "transmitBytes": 7,
    }
    assert d.columns(spec) == ["node-1", "1.2.3.4:51820", "up", "10", "7"]
    assert d.columns({}) == ["", "", "", "", ""]


def test_nat_status_resolves_by_its_aliases_and_renders_its_columns():
    d = resolve_type("kubespannat")
    assert d is resolve_type("kubespannatstatuses") and d.type == c.KUBESPAN_NAT_STATUS
    assert [col.name.upper() for col in d.print_columns] == ["CLASS", "MAPPED", "PUBLISHED", "ERROR"]
    spec = {
        "natClass": "eim",
        "mappedEndpoint": "198.51.100.7:40000",
        "publishedEndpoint": "198.51.100.7:40000",
    }
    assert d.columns({**spec, "error": ""}) == ["eim", "198.51.100.7:40000", "198.51.100.7:40000", ""]


def test_jsonpath_subset():
    data = {"a": {"b": [{"c": 1}, {"c": 2}]}, "ok": True, "list": ["x", "y"]}
    assert PrintColumn("n", "{.a.b[1].c}").render(data) == "2"
    assert PrintColumn("n", "{.a.b[*].c}").render(data) == "1 2"
    assert PrintColumn("n", "{.a.b[-1].c}").render(data) == "2"
    assert PrintColumn("n", "{.ok}").render(data) == "true"
    assert PrintColumn("n", "{.list}").render(data) == '["x","y"]'
    assert PrintColumn("n", ".a.missing").render(data) == ""
    with pytest.raises(DefinitionError, match="JSONPath"):
        PrintColumn("n", "{.a[x]}")


async def test_definitions_live_in_the_meta_namespace():
    s = State()
    assert [d.type for d in s.definitions()] == [RESOURCE_DEFINITION_TYPE]
    w = s.watch(META_NAMESPACE, RESOURCE_DEFINITION_TYPE, bootstrap=False)
    await s.register(*MESH_DEFINITIONS)
    await s.register(*MESH_DEFINITIONS)  # equal again: no events
    assert w.pending() == len(MESH_DEFINITIONS)
    assert {e.type for e in [await anext(w) for _ in MESH_DEFINITIONS]} == {EventType.CREATED}
    assert {d.type for d in s.definitions()} == {d.type for d in DEFINITIONS}
    res = await s.get(META_NAMESPACE, RESOURCE_DEFINITION_TYPE, "kubespanpeerstatuses.kubespan.talos.dev")
    spec = yaml.safe_load(res.yaml_spec)
    assert spec["defaultNamespace"] == "kubespan" and "ksps" in spec["allAliases"]
    assert spec["printColumns"][3] == {"name": "Rx", "jsonPath": "{.receiveBytes}"}
    assert (
        yaml.safe_load(
            (
                await s.get(META_NAMESPACE, RESOURCE_DEFINITION_TYPE, "kubespanidentities.kubespan.talos.dev")
            ).yaml_spec
        )["sensitivity"]
        == "sensitive"
    )
    assert s.resolve_type("links").type == c.LINK_STATUS
    assert s.definition("LinkStatuses.net.talos.dev").default_namespace == "network"
    with pytest.raises(UnknownTypeError):
        State().resolve_type("links")  # not registered in a fresh state

"""Print columns and aliases of Talos's types, as Talos defines them (each type's
``ResourceDefinition`` in Talos's ``pkg/machinery/resources``: column names and JSONPaths), and
cells rendered as talosctl renders them (k8s JSONPath: scalars as text, lists and maps as compact
JSON with sorted keys)."""

from __future__ import annotations

import io

import pytest
import yaml

from machined.spanctl.output import ResourceWriter
from machined.state import catalog as c
from machined.state.catalog import resolve_type
from machined.state.definitions import go_json, go_text
from spanapi.talos.cosi import resource_pb2

# facts from Talos v1.14 (pkg/machinery/resources/<group>/<type>.go)
TALOS_COLUMNS: dict[str, list[tuple[str, str]]] = {
    c.IDENTITY: [("ID", "{.nodeId}")],
    c.AFFILIATE: [
        ("Hostname", "{.hostname}"),
        ("Machine Type", "{.machineType}"),
        ("Addresses", "{.addresses}"),
    ],
    c.MEMBER: [
        ("Hostname", "{.hostname}"),
        ("Machine Type", "{.machineType}"),
        ("OS", "{.operatingSystem}"),
        ("Addresses", "{.addresses}"),
    ],
    c.LINK_STATUS: [
        ("Alias", "{.alias}"),
        ("Type", "{.type}"),
        ("Kind", "{.kind}"),
        ("Hw Addr", "{.hardwareAddr}"),
        ("Oper State", "{.operationalState}"),
        ("Link State", "{.linkState}"),
    ],
    c.NODE_ADDRESS: [("Addresses", "{.addresses}"), ("SortAlgorithm", "{.sortAlgorithm}")],
    c.ADDRESS_STATUS: [("Address", "{.address}"), ("Link", "{.linkName}")],
    c.ROUTE_STATUS: [
        ("Destination", "{.dst}"),
        ("Gateway", "{.gateway}"),
        ("Link", "{.outLinkName}"),
        ("Metric", "{.priority}"),
    ],
    c.KUBESPAN_IDENTITY: [("Address", "{.address}"), ("PublicKey", "{.publicKey}")],
    c.KUBESPAN_PEER_SPEC: [("Label", "{.label}"), ("Endpoints", "{.endpoints}")],
    c.KUBESPAN_PEER_STATUS: [
        ("Label", "{.label}"),
        ("Endpoint", "{.endpoint}"),
        ("State", "{.state}"),
        ("Rx", "{.receiveBytes}"),
        ("Tx", "{.transmitBytes}"),
    ],
    c.KUBESPAN_ENDPOINT: [("Endpoint", "{.endpoint}"), ("Affiliate ID", "{.affiliateID}")],
    c.SERVICE: [("Running", "{.running}"), ("Healthy", "{.healthy}"), ("Health Unknown", "{.unknown}")],
    c.MACHINE_STATUS: [("Stage", "{.stage}"), ("Ready", "{.status.ready}")],
    c.KUBESPAN_CONFIG: [],
    c.MACHINE_CONFIG: [],
}
TALOS_ALIASES = {
    c.SERVICE: ["svc"],
    c.LINK_STATUS: ["link", "links"],
    c.ADDRESS_STATUS: ["address", "addresses"],
    c.ROUTE_STATUS: ["route", "routes"],
}


@pytest.mark.parametrize("type_", sorted(TALOS_COLUMNS))
def test_print_columns_are_talos_own(type_: str) -> None:
    d = resolve_type(type_)
    assert [(p.name, p.json_path) for p in d.print_columns] == TALOS_COLUMNS[type_]
    assert list(d.aliases) == TALOS_ALIASES.get(type_, [])


def test_identities_is_served_in_the_cluster_namespace() -> None:
    d = resolve_type("identities")
    assert d.type == "Identities.cluster.talos.dev" and d.default_namespace == "cluster"
    assert d is resolve_type("identity") and not d.sensitive


def test_svc_alias_names_services() -> None:
    assert resolve_type("svc").type == c.SERVICE


def render(type_: str, spec: dict, id_: str = "x") -> tuple[list[str], list[str]]:
    d = resolve_type(type_)
    out = io.StringIO()
    w = ResourceWriter(out, "table", d)
    res = resource_pb2.Resource(
        metadata=resource_pb2.Metadata(namespace=d.default_namespace, type=d.type, id=id_, version="1"),
        spec=resource_pb2.Spec(yaml_spec=yaml.safe_dump(spec)),
    )
    w.add("n1", res)
    w.flush()
    header, row = out.getvalue().splitlines()
    return header.split("   "), row


def test_affiliate_row_lists_addresses_as_compact_json() -> None:
    spec = {
        "nodeId": "abc",
        "addresses": ["10.0.0.1", "fd00::1"],
        "hostname": "n2",
        "machineType": "worker",
        "operatingSystem": "Talos (v1.14.0)",
    }
    d = resolve_type(c.AFFILIATE)
    assert d.columns(spec) == ["n2", "worker", '["10.0.0.1","fd00::1"]']
    header, row = render(c.AFFILIATE, spec, "abc")
    assert [h.strip() for h in header if h.strip()] == [
        "NODE",
        "NAMESPACE",
        "TYPE",
        "ID",
        "VERSION",
        "HOSTNAME",
        "MACHINE TYPE",
        "ADDRESSES",
    ]
    assert row.split() == [
        "n1",
        "cluster",
        "Affiliates",
        "abc",
        "1",
        "n2",
        "worker",
        '["10.0.0.1","fd00::1"]',
    ]


def test_identity_link_and_node_address_rows() -> None:
    assert resolve_type(c.IDENTITY).columns({"nodeId": "7x9"}) == ["7x9"]
    link = {
        "type": "ether",
        "kind": "",
        "hardwareAddr": "2e:1a:b6:53:81:69",
        "operationalState": "up",
        "linkState": True,
    }
    # no alias: an empty cell, as talosctl (missing keys allowed)
    assert resolve_type("links").columns(link) == ["", "ether", "", "2e:1a:b6:53:81:69", "up", "true"]
    na = {"addresses": ["10.5.0.1/24"], "sortAlgorithm": "v1"}
    assert resolve_type(c.NODE_ADDRESS).columns(na) == ['["10.5.0.1/24"]', "v1"]


def test_cells_follow_go_encoding() -> None:
    assert go_text(False) == "false" and go_text(7) == "7" and go_text(None) == ""
    assert go_json({"b": 1, "a": "<&>"}) == '{"a":"\\u003c\\u0026\\u003e","b":1}'
    assert go_json(["é"]) == '["é"]'

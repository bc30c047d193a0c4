"""spanctl output: talosctl-style tables, resources as table/yaml/json, the watch ``*`` column."""

from __future__ import annotations

import io
import json

import yaml
from google.protobuf import timestamp_pb2

from machined.spanctl.output import (
    ResourceWriter,
    definition_from_spec,
    format_row,
    resource_data,
    table,
    widths,
)
from machined.spanctl.testing import PEER_STATUS_HEADER
from machined.state.catalog import MESH_DEFINITIONS
from spanapi.talos.cosi import resource_pb2, state_pb2

PEER_STATUS = "KubeSpanPeerStatuses.kubespan.talos.dev"


def peer_definition():  # the definition as the client sees it: parsed from the server's meta resource
    d = next(d for d in MESH_DEFINITIONS if d.type == PEER_STATUS)
    return definition_from_spec(d.to_data())


def peer(id_: str, label: str, state: str, version: int = 1) -> resource_pb2.Resource:
    spec = {
        "label": label,
        "endpoint": "198.51.100.7:51820",
        "state": state,
        "receiveBytes": 100,
        "transmitBytes": 200,
        "lastHandshakeTime": "2026-11-25T19:00:00Z",
    }
    return resource_pb2.Resource(
        metadata=resource_pb2.Metadata(
            namespace="kubespan",
            type=PEER_STATUS,
            id=id_,
            version=str(version),
            owner="kubespan.ManagerController",
            phase="running",
            created=timestamp_pb2.Timestamp(seconds=1_800_000_000),
            updated=timestamp_pb2.Timestamp(seconds=1_800_000_010),
            labels={"b": "2", "a": "1"},
        ),
        spec=resource_pb2.Spec(yaml_spec=yaml.safe_dump(spec, sort_keys=False)),
    )


def test_table_uppercase_headers_three_space_padding() -> None:
    out = table(["node", "service", "state"], [["n1", "etcd", "Running"], ["node-two", "x", "Failed"]])
    assert out.splitlines() == [
        "NODE       SERVICE   STATE",
        "n1         etcd      Running",
        "node-two   x         Failed",
    ]


def test_format_row_strips_trailing_blank_cells() -> None:
    w = widths([["a", "bb", ""]])
    assert format_row(["a", "bb", ""], w) == "a   bb"


def test_definition_from_server_spec_keeps_aliases_and_columns() -> None:
    d = peer_definition()
    assert d.default_namespace == "kubespan"
    assert d.matches("kubespanpeerstatuses") and d.matches("KubeSpanPeerStatus")
    assert [c.name for c in d.print_columns] == ["Label", "Endpoint", "State", "Rx", "Tx"]


def test_resource_table_node_first_with_print_columns() -> None:
    buf = io.StringIO()
    w = ResourceWriter(buf, "table", peer_definition())
    w.add("n1", peer("KEY1=", "n2", "up"))
    w.add("n1", peer("KEY2=", "n3", "down", version=7))
    w.flush()
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == PEER_STATUS_HEADER
    assert lines[1].split() == [
        "n1",
        "kubespan",
        "KubeSpanPeerStatuses",
        "KEY1=",
        "1",
        "n2",
        "198.51.100.7:51820",
        "up",
        "100",
        "200",
    ]
    assert lines[2].split()[3:8] == ["KEY2=", "7", "n3", "198.51.100.7:51820", "down"]
    # columns are aligned: every row has its ID at the same offset
    assert len({line.index(line.split()[3]) for line in lines}) == 1


def test_resource_yaml_documents() -> None:
    buf = io.StringIO()
    w = ResourceWriter(buf, "yaml", peer_definition())
    w.add("n1", peer("KEY1=", "n2", "up"))
    w.add("n2", peer("KEY2=", "n1", "up"))
    w.flush()
    text = buf.getvalue()
    assert text.startswith("---\nnode: n1\nmetadata:\n")
    docs = list(yaml.safe_load_all(text))
    assert [d["node"] for d in docs] == ["n1", "n2"]
    assert list(docs[0]) == ["node", "metadata", "spec"]
    md = docs[0]["metadata"]
    assert md["id"] == "KEY1=" and md["version"] == 1 and md["type"] == PEER_STATUS
    assert md["labels"] == {"a": "1", "b": "2"}
    assert md["created"] == "2027-01-15T08:00:00Z"
    assert docs[0]["spec"]["state"] == "up"


def test_resource_json_one_object_per_resource() -> None:
    buf = io.StringIO()
    w = ResourceWriter(buf, "json", peer_definition())
    w.add("n1", peer("KEY1=", "n2", "up"))
    w.add("n1", peer("KEY2=", "n3", "down"))
    text = buf.getvalue()
    dec = json.JSONDecoder()
    objs, pos = [], 0
    while pos < len(text):
        obj, end = dec.raw_decode(text, pos)
        objs.append(obj)
        pos = end + 1
    assert [o["metadata"]["id"] for o in objs] == ["KEY1=", "KEY2="]
    assert objs[1]["spec"]["state"] == "down" and objs[0]["node"] == "n1"


def test_watch_table_star_column_and_flush_after_bootstrap() -> None:
    buf = io.StringIO()
    w = ResourceWriter(buf, "table", peer_definition(), watch=True)
    w.add("n1", peer("KEY1=", "n2", "up"), state_pb2.CREATED)
    assert buf.getvalue() == ""  # held until bootstrapped
    w.flush()
    w.add("n1", peer("KEY1=", "n2", "down", version=2), state_pb2.UPDATED)
    w.flush()
    w.add("n1", peer("KEY1=", "n2", "down", version=2), state_pb2.DESTROYED)
    w.flush()
    lines = buf.getvalue().splitlines()
    # talosctl: NODE first, then the event column "*" (header "NODE   *   NAMESPACE ...")
    assert lines[0].split()[:3] == ["NODE", "*", "NAMESPACE"]
    assert lines[0].startswith("NODE   *   NAMESPACE")
    assert lines[1].startswith("n1     +   kubespan")
    assert lines[2].startswith("n1         kubespan") and lines[2].split()[7] == "down"
    assert lines[3].startswith("n1     -   kubespan")
    assert len(lines) == 4


def test_watch_yaml_and_json_carry_the_event() -> None:
    y = io.StringIO()
    ResourceWriter(y, "yaml", peer_definition(), watch=True).add(
        "n1", peer("K=", "n2", "up"), state_pb2.DESTROYED
    )
    assert yaml.safe_load(y.getvalue())["event"] == "destroyed"
    j = io.StringIO()
    ResourceWriter(j, "json", peer_definition(), watch=True).add(
        "n1", peer("K=", "n2", "up"), state_pb2.CREATED
    )
    assert json.loads(j.getvalue())["event"] == "created"


def test_multi_document_spec_is_a_list() -> None:
    r = resource_pb2.Resource(
        metadata=resource_pb2.Metadata(
            namespace="config", type="MachineConfigs.config.talos.dev", id="v1alpha1", version="1"
        ),
        spec=resource_pb2.Spec(yaml_spec="version: v1alpha1\n---\nkind: KubeSpanConfig\n"),
    )
    assert resource_data("n1", r)["spec"] == [{"version": "v1alpha1"}, {"kind": "KubeSpanConfig"}]

"""The Talos-shaped machine and COSI APIs in spanapi.talos keep upstream's wire contract.

Package names, service and method names, field numbers and enum values are what stock
talosctl and Talos's apid put on the wire; the envelope convention (every unary reply is
``repeated X messages = 1`` with ``common.Metadata metadata = 1`` first in X) is what lets
apid merge replies from several nodes by splicing and concatenating bytes.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.rpc import status_pb2

from spanapi.talos.common import common_pb2
from spanapi.talos.cosi import meta_pb2, resource_pb2, state_pb2
from spanapi.talos.machine import machine_pb2

MACHINE = machine_pb2.DESCRIPTOR.services_by_name["MachineService"]
STATE = state_pb2.DESCRIPTOR.services_by_name["State"]

# method -> (request, response, server_streaming)
MACHINE_METHODS = {
    "ApplyConfiguration": ("machine.ApplyConfigurationRequest", "machine.ApplyConfigurationResponse", False),
    "Dmesg": ("machine.DmesgRequest", "common.Data", True),
    "Events": ("machine.EventsRequest", "machine.Event", True),
    "Hostname": ("google.protobuf.Empty", "machine.HostnameResponse", False),
    "LoadAvg": ("google.protobuf.Empty", "machine.LoadAvgResponse", False),
    "Logs": ("machine.LogsRequest", "common.Data", True),
    "Memory": ("google.protobuf.Empty", "machine.MemoryResponse", False),
    "NetworkDeviceStats": ("google.protobuf.Empty", "machine.NetworkDeviceStatsResponse", False),
    "Reboot": ("machine.RebootRequest", "machine.RebootResponse", False),
    "Reset": ("machine.ResetRequest", "machine.ResetResponse", False),
    "ServiceList": ("google.protobuf.Empty", "machine.ServiceListResponse", False),
    "ServiceRestart": ("machine.ServiceRestartRequest", "machine.ServiceRestartResponse", False),
    "ServiceStart": ("machine.ServiceStartRequest", "machine.ServiceStartResponse", False),
    "ServiceStop": ("machine.ServiceStopRequest", "machine.ServiceStopResponse", False),
    "Shutdown": ("machine.ShutdownRequest", "machine.ShutdownResponse", False),
    "Upgrade": ("machine.UpgradeRequest", "machine.UpgradeResponse", False),
    "Version": ("google.protobuf.Empty", "machine.VersionResponse", False),
    "GenerateClientConfiguration": (
        "machine.GenerateClientConfigurationRequest",
        "machine.GenerateClientConfigurationResponse",
        False,
    ),
    "Netstat": ("machine.NetstatRequest", "machine.NetstatResponse", False),
}

STATE_METHODS = {
    "Get": ("cosi.resource.GetRequest", "cosi.resource.GetResponse", False),
    "List": ("cosi.resource.ListRequest", "cosi.resource.ListResponse", True),
    "Watch": ("cosi.resource.WatchRequest", "cosi.resource.WatchResponse", True),
}

# (full message name, field name) -> field number, from the upstream .proto files
FIELD_NUMBERS = {
    # common
    ("common.Metadata", "hostname"): 1,
    ("common.Metadata", "error"): 2,
    ("common.Metadata", "status"): 3,
    ("common.Data", "metadata"): 1,
    ("common.Data", "bytes"): 2,
    ("common.Empty", "metadata"): 1,
    ("common.EmptyResponse", "messages"): 1,
    ("common.DataResponse", "messages"): 1,
    ("google.rpc.Status", "code"): 1,
    ("google.rpc.Status", "message"): 2,
    ("google.rpc.Status", "details"): 3,
    # Version
    ("machine.Version", "version"): 2,
    ("machine.Version", "platform"): 3,
    ("machine.Version", "features"): 4,
    ("machine.VersionInfo", "tag"): 1,
    ("machine.VersionInfo", "sha"): 2,
    ("machine.VersionInfo", "built"): 3,
    ("machine.VersionInfo", "go_version"): 4,
    ("machine.VersionInfo", "os"): 5,
    ("machine.VersionInfo", "arch"): 6,
    ("machine.PlatformInfo", "name"): 1,
    ("machine.PlatformInfo", "mode"): 2,
    ("machine.FeaturesInfo", "rbac"): 1,
    ("machine.Hostname", "hostname"): 2,
    # ApplyConfiguration
    ("machine.ApplyConfigurationRequest", "data"): 1,
    ("machine.ApplyConfigurationRequest", "mode"): 4,
    ("machine.ApplyConfigurationRequest", "dry_run"): 5,
    ("machine.ApplyConfigurationRequest", "try_mode_timeout"): 6,
    ("machine.ApplyConfiguration", "warnings"): 2,
    ("machine.ApplyConfiguration", "mode"): 3,
    ("machine.ApplyConfiguration", "mode_details"): 4,
    # services
    ("machine.ServiceList", "services"): 2,
    ("machine.ServiceInfo", "id"): 1,
    ("machine.ServiceInfo", "state"): 2,
    ("machine.ServiceInfo", "events"): 3,
    ("machine.ServiceInfo", "health"): 4,
    ("machine.ServiceEvents", "events"): 1,
    ("machine.ServiceEvent", "msg"): 1,
    ("machine.ServiceEvent", "state"): 2,
    ("machine.ServiceEvent", "ts"): 3,
    ("machine.ServiceHealth", "unknown"): 1,
    ("machine.ServiceHealth", "healthy"): 2,
    ("machine.ServiceHealth", "last_message"): 3,
    ("machine.ServiceHealth", "last_change"): 4,
    ("machine.ServiceStartRequest", "id"): 1,
    ("machine.ServiceStart", "resp"): 2,
    ("machine.ServiceStop", "resp"): 2,
    ("machine.ServiceRestart", "resp"): 2,
    # logs, dmesg, events
    ("machine.LogsRequest", "namespace"): 1,
    ("machine.LogsRequest", "id"): 2,
    ("machine.LogsRequest", "driver"): 3,
    ("machine.LogsRequest", "follow"): 4,
    ("machine.LogsRequest", "tail_lines"): 5,
    ("machine.DmesgRequest", "follow"): 1,
    ("machine.DmesgRequest", "tail"): 2,
    ("machine.EventsRequest", "tail_events"): 1,
    ("machine.EventsRequest", "tail_id"): 2,
    ("machine.EventsRequest", "tail_seconds"): 3,
    ("machine.EventsRequest", "with_actor_id"): 4,
    ("machine.Event", "metadata"): 1,
    ("machine.Event", "data"): 2,
    ("machine.Event", "id"): 3,
    ("machine.Event", "actor_id"): 4,
    ("machine.ServiceStateEvent", "service"): 1,
    ("machine.ServiceStateEvent", "action"): 2,
    ("machine.ServiceStateEvent", "message"): 3,
    ("machine.ServiceStateEvent", "health"): 4,
    ("machine.MachineStatusEvent", "stage"): 1,
    ("machine.MachineStatusEvent", "status"): 2,
    # diagnostics
    ("machine.Memory", "meminfo"): 2,
    ("machine.MemInfo", "memtotal"): 1,
    ("machine.MemInfo", "memavailable"): 3,
    ("machine.MemInfo", "directmap1g"): 48,
    ("machine.LoadAvg", "load1"): 2,
    ("machine.LoadAvg", "load15"): 4,
    ("machine.NetworkDeviceStats", "total"): 2,
    ("machine.NetworkDeviceStats", "devices"): 3,
    ("machine.NetDev", "rx_bytes"): 2,
    ("machine.NetDev", "tx_bytes"): 10,
    ("machine.NetDev", "tx_compressed"): 17,
    ("machine.NetstatRequest", "filter"): 1,
    ("machine.NetstatRequest", "l4proto"): 3,
    ("machine.NetstatRequest", "netns"): 4,
    ("machine.ConnectRecord", "state"): 6,
    ("machine.ConnectRecord", "process"): 17,
    ("machine.ConnectRecord", "netns"): 18,
    ("machine.Netstat", "connectrecord"): 2,
    # lifecycle (refused, but decodable)
    ("machine.RebootRequest", "mode"): 1,
    ("machine.Reboot", "actor_id"): 2,
    ("machine.ShutdownRequest", "force"): 1,
    ("machine.ResetRequest", "mode"): 5,
    ("machine.UpgradeRequest", "reboot_mode"): 5,
    ("machine.Upgrade", "ack"): 2,
    ("machine.Upgrade", "actor_id"): 3,
    # client configuration
    ("machine.GenerateClientConfigurationRequest", "roles"): 1,
    ("machine.GenerateClientConfigurationRequest", "crt_ttl"): 2,
    ("machine.GenerateClientConfiguration", "ca"): 2,
    ("machine.GenerateClientConfiguration", "crt"): 3,
    ("machine.GenerateClientConfiguration", "key"): 4,
    ("machine.GenerateClientConfiguration", "talosconfig"): 5,
    # COSI resources
    ("cosi.resource.Resource", "metadata"): 1,
    ("cosi.resource.Resource", "spec"): 2,
    ("cosi.resource.Metadata", "namespace"): 1,
    ("cosi.resource.Metadata", "type"): 2,
    ("cosi.resource.Metadata", "id"): 3,
    ("cosi.resource.Metadata", "version"): 4,
    ("cosi.resource.Metadata", "owner"): 5,
    ("cosi.resource.Metadata", "phase"): 6,
    ("cosi.resource.Metadata", "created"): 7,
    ("cosi.resource.Metadata", "updated"): 8,
    ("cosi.resource.Metadata", "finalizers"): 9,
    ("cosi.resource.Metadata", "labels"): 10,
    ("cosi.resource.Metadata", "annotations"): 11,
    ("cosi.resource.Spec", "proto_spec"): 1,
    ("cosi.resource.Spec", "yaml_spec"): 2,
    ("cosi.resource.LabelTerm", "key"): 1,
    ("cosi.resource.LabelTerm", "op"): 2,
    ("cosi.resource.LabelTerm", "value"): 3,
    ("cosi.resource.LabelTerm", "invert"): 5,
    ("cosi.resource.LabelQuery", "terms"): 1,
    ("cosi.resource.IDQuery", "regexp"): 1,
    # COSI state
    ("cosi.resource.Event", "resource"): 1,
    ("cosi.resource.Event", "event_type"): 2,
    ("cosi.resource.Event", "old"): 3,
    ("cosi.resource.Event", "error"): 4,
    ("cosi.resource.Event", "bookmark"): 5,
    ("cosi.resource.GetRequest", "namespace"): 1,
    ("cosi.resource.GetRequest", "type"): 2,
    ("cosi.resource.GetRequest", "id"): 3,
    ("cosi.resource.GetRequest", "options"): 4,
    ("cosi.resource.GetResponse", "resource"): 1,
    ("cosi.resource.ListRequest", "options"): 3,
    ("cosi.resource.ListOptions", "label_query"): 1,
    ("cosi.resource.ListOptions", "id_query"): 2,
    ("cosi.resource.ListResponse", "resource"): 1,
    ("cosi.resource.WatchRequest", "namespace"): 1,
    ("cosi.resource.WatchRequest", "type"): 2,
    ("cosi.resource.WatchRequest", "id"): 3,
    ("cosi.resource.WatchRequest", "options"): 4,
    ("cosi.resource.WatchRequest", "api_version"): 5,
    ("cosi.resource.WatchOptions", "bootstrap_contents"): 1,
    ("cosi.resource.WatchOptions", "tail_events"): 2,
    ("cosi.resource.WatchOptions", "label_query"): 3,
    ("cosi.resource.WatchOptions", "id_query"): 4,
    ("cosi.resource.WatchOptions", "aggregated"): 5,
    ("cosi.resource.WatchOptions", "start_from_bookmark"): 6,
    ("cosi.resource.WatchOptions", "bootstrap_bookmark"): 7,
    ("cosi.resource.WatchResponse", "event"): 1,
    # COSI meta
    ("cosi.resource.meta.ResourceDefinitionSpec", "resource_type"): 1,
    ("cosi.resource.meta.ResourceDefinitionSpec", "display_type"): 2,
    ("cosi.resource.meta.ResourceDefinitionSpec", "default_namespace"): 3,
    ("cosi.resource.meta.ResourceDefinitionSpec", "aliases"): 4,
    ("cosi.resource.meta.ResourceDefinitionSpec", "all_aliases"): 5,
    ("cosi.resource.meta.ResourceDefinitionSpec", "print_columns"): 6,
    ("cosi.resource.meta.ResourceDefinitionSpec", "sensitivity"): 7,
    ("cosi.resource.meta.ResourceDefinitionSpec.PrintColumn", "json_path"): 2,
}

# (full enum name) -> {value name: number}
ENUMS = {
    "machine.ApplyConfigurationRequest.Mode": {"REBOOT": 0, "AUTO": 1, "NO_REBOOT": 2, "STAGED": 3, "TRY": 4},
    "machine.RebootRequest.Mode": {"DEFAULT": 0, "POWERCYCLE": 1, "FORCE": 2},
    "machine.ServiceStateEvent.Action": {
        "INITIALIZED": 0,
        "PREPARING": 1,
        "WAITING": 2,
        "RUNNING": 3,
        "STOPPING": 4,
        "FINISHED": 5,
        "FAILED": 6,
        "SKIPPED": 7,
        "STARTING": 8,
    },
    "common.ContainerDriver": {"CONTAINERD": 0, "CRI": 1},
    "cosi.resource.EventType": {
        "CREATED": 0,
        "UPDATED": 1,
        "DESTROYED": 2,
        "BOOTSTRAPPED": 3,
        "ERRORED": 4,
        "NOOP": 5,
    },
    "cosi.resource.LabelTerm.Operation": {
        "EXISTS": 0,
        "EQUAL": 1,
        "NOT_EXISTS": 2,
        "IN": 3,
        "LT": 4,
        "LTE": 5,
        "LT_NUMERIC": 6,
        "LTE_NUMERIC": 7,
    },
    "cosi.resource.meta.ResourceDefinitionSpec.Sensitivity": {"NON_SENSITIVE": 0, "SENSITIVE": 1},
}

POOL = machine_pb2.DESCRIPTOR.pool


def test_package_names() -> None:
    assert common_pb2.DESCRIPTOR.package == "common"
    assert machine_pb2.DESCRIPTOR.package == "machine"
    assert resource_pb2.DESCRIPTOR.package == "cosi.resource"
    assert state_pb2.DESCRIPTOR.package == "cosi.resource"
    assert meta_pb2.DESCRIPTOR.package == "cosi.resource.meta"
    assert status_pb2.DESCRIPTOR.package == "google.rpc"


def test_service_full_names() -> None:
    assert MACHINE.full_name == "machine.MachineService"
    assert STATE.full_name == "cosi.resource.State"


@pytest.mark.parametrize(("service", "expected"), [(MACHINE, MACHINE_METHODS), (STATE, STATE_METHODS)])
def test_methods_and_streaming(service, expected) -> None:
    got = {
        m.name: (m.input_type.full_name, m.output_type.full_name, m.server_streaming) for m in service.methods
    }
    assert got == expected
    # apid proxies raw bytes and must know streaming shapes; nothing here streams from the client.
    assert not any(m.client_streaming for m in service.methods)


def test_field_numbers() -> None:
    wrong = {}
    for (msg, field), number in FIELD_NUMBERS.items():
        got = POOL.FindMessageTypeByName(msg).fields_by_name[field].number
        if got != number:
            wrong[(msg, field)] = got
    assert not wrong, wrong


def test_enum_values() -> None:
    for name, values in ENUMS.items():
        enum = POOL.FindEnumTypeByName(name)
        assert {v.name: v.number for v in enum.values} == values, name


def test_optional_fields_track_presence() -> None:
    # upstream declares these proto3 `optional`; presence is part of the contract.
    for msg, field in [
        ("cosi.resource.WatchRequest", "id"),
        ("cosi.resource.Event", "error"),
        ("cosi.resource.Event", "bookmark"),
        ("cosi.resource.WatchOptions", "start_from_bookmark"),
    ]:
        assert POOL.FindMessageTypeByName(msg).fields_by_name[field].has_presence, (msg, field)


def _field1(desc: Descriptor) -> FieldDescriptor:
    return desc.fields_by_number[1]


def _is_metadata(field: FieldDescriptor) -> bool:
    return (
        field.name == "metadata"
        and field.message_type is not None
        and field.message_type.full_name == "common.Metadata"
        and not field.is_repeated
    )


def test_every_unary_reply_is_an_envelope() -> None:
    unary = [m for m in MACHINE.methods if not m.server_streaming]
    assert len(unary) == 16
    for method in unary:
        reply = method.output_type
        messages = _field1(reply)
        assert messages.name == "messages", method.name
        assert messages.is_repeated, method.name
        assert messages.message_type is not None, method.name
        assert _is_metadata(_field1(messages.message_type)), method.name
        assert [f.number for f in reply.fields] == [1], f"{method.name}: the envelope carries only messages"


def test_every_stream_item_starts_with_metadata() -> None:
    for method in MACHINE.methods:
        if method.server_streaming:
            assert _is_metadata(_field1(method.output_type)), method.name
    assert _is_metadata(_field1(common_pb2.EmptyResponse.DESCRIPTOR.fields_by_number[1].message_type))


def test_replies_merge_by_concatenation() -> None:
    # apid concatenates per-node replies; repeated field 1 makes that a list of all of them.
    a = machine_pb2.HostnameResponse(messages=[machine_pb2.Hostname(hostname="a")])
    b = machine_pb2.HostnameResponse(messages=[machine_pb2.Hostname(hostname="b")])
    merged = machine_pb2.HostnameResponse.FromString(a.SerializeToString() + b.SerializeToString())
    assert [m.hostname for m in merged.messages] == ["a", "b"]


def test_hostname_splice_sets_metadata() -> None:
    # apid appends a serialized common.Empty{metadata{hostname}} inside each field-1 item:
    # field 1 of Empty is field 1 of every reply item, so the item gains metadata.hostname.
    reply = machine_pb2.VersionResponse(
        messages=[machine_pb2.Version(version=machine_pb2.VersionInfo(tag="v0.1.0"))]
    )
    wire = reply.SerializeToString()
    assert wire[0] == 0x0A  # field 1, length-delimited
    length, body = wire[1], wire[2:]
    assert length == len(body) < 0x80
    splice = common_pb2.Empty(metadata=common_pb2.Metadata(hostname="10.5.0.2")).SerializeToString()
    item = body + splice
    spliced = bytes([0x0A, len(item)]) + item
    got = machine_pb2.VersionResponse.FromString(spliced)
    assert got.messages[0].metadata.hostname == "10.5.0.2"
    assert got.messages[0].version.tag == "v0.1.0"


def test_error_entry_decodes_as_any_reply() -> None:
    # A failed node contributes EmptyResponse bytes; they must decode inside any reply type.
    err = common_pb2.EmptyResponse(
        messages=[
            common_pb2.Empty(
                metadata=common_pb2.Metadata(
                    hostname="10.5.0.3",
                    error="connection refused",
                    status=status_pb2.Status(code=14, message="connection refused"),
                )
            )
        ]
    ).SerializeToString()
    got = machine_pb2.ServiceListResponse.FromString(err)
    assert got.messages[0].metadata.hostname == "10.5.0.3"
    assert got.messages[0].metadata.status.code == 14
    assert not got.messages[0].services


def test_known_bytes() -> None:
    # Hand-computed encodings pin the wire form independently of the descriptors.
    req = machine_pb2.ApplyConfigurationRequest(
        data=b"x", mode=machine_pb2.ApplyConfigurationRequest.TRY, dry_run=True
    )
    req.try_mode_timeout.seconds = 60
    assert req.SerializeToString() == b"\x0a\x01x" + b"\x20\x04" + b"\x28\x01" + b"\x32\x02\x08\x3c"
    term = resource_pb2.LabelTerm(key="k", op=resource_pb2.LabelTerm.IN, value=["a", "b"], invert=True)
    assert term.SerializeToString() == b"\x0a\x01k\x10\x03\x1a\x01a\x1a\x01b\x28\x01"
    watch = state_pb2.WatchRequest(namespace="n", type="t", api_version=1)
    watch.options.bootstrap_contents = True
    assert watch.SerializeToString() == b"\x0a\x01n\x12\x01t\x22\x02\x08\x01\x28\x01"

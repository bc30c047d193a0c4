import grpc
import pytest

from machined.apid import wire
from machined.apid.proxy import backend_target, forward_metadata, method_kind, splices
from spanapi.talos.common import common_pb2
from spanapi.talos.machine import machine_pb2


def version_reply(*hosts: str) -> bytes:
    return machine_pb2.VersionResponse(
        messages=[
            machine_pb2.Version(
                metadata=common_pb2.Metadata(hostname=h), version=machine_pb2.VersionInfo(tag=f"v{i}")
            )
            for i, h in enumerate(hosts)
        ]
    ).SerializeToString()


def test_splice_sets_hostname_to_the_target_as_given():
    raw = version_reply("", "n2")
    out = machine_pb2.VersionResponse.FromString(wire.splice_reply(raw, "10.0.0.1"))
    assert [m.metadata.hostname for m in out.messages] == ["10.0.0.1", "10.0.0.1"]
    assert [m.version.tag for m in out.messages] == ["v0", "v1"]


def test_splice_item_without_metadata_and_with_error_metadata():
    item = machine_pb2.Version(version=machine_pb2.VersionInfo(tag="t")).SerializeToString()
    v = machine_pb2.Version.FromString(wire.splice_item(item, "n"))
    assert v.metadata.hostname == "n" and v.version.tag == "t"
    item = machine_pb2.Version(metadata=common_pb2.Metadata(error="boom")).SerializeToString()
    v = machine_pb2.Version.FromString(wire.splice_item(item, "n"))
    assert (v.metadata.hostname, v.metadata.error) == ("n", "boom")
    data = common_pb2.Data(bytes=b"log line").SerializeToString()
    d = common_pb2.Data.FromString(wire.splice_item(data, "n"))
    assert (d.metadata.hostname, d.bytes) == ("n", b"log line")


def test_merge_concatenates_and_error_entries_decode_as_items():
    merged = wire.merge(
        [
            wire.splice_reply(version_reply(""), "a"),
            wire.error_reply("b", grpc.StatusCode.UNAVAILABLE, "b: unreachable"),
            wire.splice_reply(version_reply("", ""), "c"),
        ]
    )
    out = machine_pb2.VersionResponse.FromString(merged)
    assert [m.metadata.hostname for m in out.messages] == ["a", "b", "c", "c"]
    err = out.messages[1].metadata
    assert err.error == "b: unreachable" and err.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert not out.messages[1].HasField("version")
    e = common_pb2.Empty.FromString(wire.error_item("x", grpc.StatusCode.INTERNAL, "m"))
    assert (e.metadata.hostname, e.metadata.error) == ("x", "m")


def test_empty_reply_and_malformed_bytes():
    assert wire.splice_reply(b"", "a") == b""
    for bad in (b"\x0a\x05ab", b"\x80", b"\x0f", b"\x00\x01"):
        with pytest.raises(wire.WireError):
            wire.splice_reply(bad, "a")


def test_method_kinds_from_descriptors():
    assert method_kind("/machine.MachineService/Version") == "unary"
    assert method_kind("/machine.MachineService/Logs") == "server_stream"
    assert method_kind("/cosi.resource.State/Watch") == "server_stream"
    assert method_kind("/cosi.resource.State/Get") == "unary"
    assert method_kind("/machine.MachineService/Copy") == "server_stream"  # not in our stubs: Talos's list
    assert method_kind("/x.Y/FooStream") == "server_stream"
    assert method_kind("/x.Y/Foo") == "unary"
    assert splices("/machine.MachineService/Version") and not splices("/cosi.resource.State/Get")


def test_backend_targets_and_metadata_filter():
    assert backend_target("10.0.0.1") == "10.0.0.1:50000"
    assert backend_target("node-1") == "node-1:50000"
    assert backend_target("127.0.0.1:1234") == "127.0.0.1:1234"
    assert backend_target("fd00::1") == "[fd00::1]:50000"
    assert backend_target("[fd00::1]") == "[fd00::1]:50000"
    assert backend_target("[fd00::1]:7") == "[fd00::1]:7"
    assert backend_target(" Node_1.example.com:7 ") == "Node_1.example.com:7"
    assert backend_target("fe80::1%eth0") == "[fe80::1%eth0]:50000"
    assert backend_target("unix:1234") == "unix:1234"  # a host named unix (dialed as dns:///unix:1234)
    assert backend_target("h" * 249 + ":50000") == "h" * 249 + ":50000"  # 255 characters: the limit
    md = [("talos-role", "os:admin"), ("node", "a"), ("nodes", "b"), ("proxyfrom", "x"), (":authority", "h"),
          ("user-agent", "u"), ("grpc-timeout", "1"), ("x-trace", "t")]  # fmt: skip
    assert forward_metadata(md) == [("x-trace", "t")]

"""proto_spec: every served type's spec decodes, the way talosctl decodes it (Talos's message for the
type, field by number), to the same fields as its yaml_spec.

The decoding here is independent of machined/api/protospec.py's encoding tables: YAML keys come from
Talos's ``yaml:`` struct tags (``TALOS_YAML_KEYS`` below, camelCase of the field name otherwise),
enum values from the names in Talos's enums.proto, addresses from the raw bytes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from google.protobuf import descriptor, message

from machined.api import protospec
from machined.api.convert import resource
from machined.config import MachineConfig
from machined.config.testing import config_yaml
from machined.controllers.cluster import _affiliate_spec
from machined.controllers.config import MachineConfigSpec, kubespan_config_spec
from machined.controllers.runtime import service_spec
from machined.daemon.netinfo import _IFF, address_spec, link_spec, route_spec
from machined.services import ServiceState
from machined.state import DEFINITIONS, Resource
from spanapi.talos.cosi import meta_pb2
from spanapi.talos.resource.config import config_pb2
from spanapi.talos.resource.definitions.kubespan import kubespan_pb2

_FD = descriptor.FieldDescriptor

# Talos's yaml tag of each field whose tag is not the camelCase of the proto field name
# (pkg/machinery/resources/*, cosi-project/runtime pkg/resource/meta/spec).
TALOS_YAML_KEYS = {
    "cosi.resource.meta.ResourceDefinitionSpec.resource_type": "type",
    "talos.resource.definitions.kubespan.EndpointSpec.affiliate_id": "affiliateID",
    "talos.resource.definitions.kubespan.PeerSpecSpec.allowed_ips": "allowedIPs",
    "talos.resource.definitions.cluster.AffiliateSpec.kube_span": "kubespan",
    "talos.resource.definitions.cluster.ControlPlane.api_server_port": "port",
    "talos.resource.definitions.network.LinkStatusSpec.speed_megabits": "speedMbit",
    "talos.resource.definitions.network.LinkStatusSpec.pciid": "pciID",
    "talos.resource.definitions.network.LinkStatusSpec.product_id": "productID",
    "talos.resource.definitions.network.LinkStatusSpec.vendor_id": "vendorID",
    "talos.resource.definitions.network.RouteStatusSpec.destination": "dst",
    "talos.resource.definitions.network.RouteStatusSpec.source": "src",
}
# prefix of each Talos enum's value names; the rest, camelCased, is the YAML text ...
ENUM_PREFIX = {
    "KubespanPeerState": "PEER_STATE_",
    "MachineType": "TYPE_",
    "RuntimeMachineStage": "MACHINE_STAGE_",
    "NethelpersFamily": "FAMILY_",
    "NethelpersScope": "SCOPE_",
    "NethelpersLinkType": "LINK_",
    "NethelpersOperationalState": "OPER_STATE_",
    "NethelpersRoutingTable": "TABLE_",
    "NethelpersRouteType": "TYPE_",
    "NethelpersRouteProtocol": "PROTOCOL_",
    "NethelpersAddressSortAlgorithm": "ADDRESS_SORT_ALGORITHM_",
    "Sensitivity": "",
}
# ... except where our YAML (netlink's or Talos's Go names) spells it otherwise
ENUM_TEXT = {
    ("MachineType", "controlPlane"): "controlplane",
    ("NethelpersLinkType", "loopbck"): "loopback",
    ("NethelpersLinkType", "tunnel"): "ipip",
    ("NethelpersOperationalState", "notPresent"): "notpresent",
    ("NethelpersOperationalState", "lowerLayerDown"): "lowerlayerdown",
    ("NethelpersRouteType", "unspec"): "unspecified",
    ("NethelpersRouteProtocol", "unspec"): "unspecified",
    ("Sensitivity", "nonSensitive"): "non-sensitive",
}
LINK_FLAG_BITS = dict(_IFF)  # the table our YAML's names come from
ADDRESS_FLAG_BITS = {0x80: "permanent"}
FLAGS = {
    "talos.resource.definitions.network.LinkStatusSpec.flags": LINK_FLAG_BITS,
    "talos.resource.definitions.network.AddressStatusSpec.flags": ADDRESS_FLAG_BITS,
}
HW_ADDRS = {"hardware_addr", "broadcast_addr", "permanent_addr"}


def camel(name: str) -> str:
    parts = name.split("_")
    return parts[0] + "".join(p.capitalize() for p in parts[1:])


def yaml_key(fd: descriptor.FieldDescriptor) -> str:
    return TALOS_YAML_KEYS.get(fd.full_name, camel(fd.name))


def enum_text(fd: descriptor.FieldDescriptor, number: int) -> str:
    enum = fd.enum_type
    value = enum.values_by_number.get(number)
    prefix = ENUM_PREFIX[enum.name]
    if value is None or not value.name.startswith(prefix):
        return str(number)  # TABLE100 and numbers Talos has no name for
    text = camel(value.name[len(prefix) :].lower())
    return ENUM_TEXT.get((enum.name, text), text)


def address_message(msg: message.Message) -> str | None:
    name = msg.DESCRIPTOR.full_name
    if name == "common.NetIP":
        return str(ipaddress.ip_address(msg.ip))  # type: ignore[attr-defined]
    if name == "common.NetIPPrefix":
        return f"{ipaddress.ip_address(msg.ip)}/{msg.prefix_length}"  # type: ignore[attr-defined]
    if name == "common.NetIPPort":
        ip = ipaddress.ip_address(msg.ip)  # type: ignore[attr-defined]
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{host}:{msg.port}"  # type: ignore[attr-defined]
    if name == "google.protobuf.Timestamp":
        return msg.ToJsonString()  # type: ignore[attr-defined]
    return None


def talos_view(msg: message.Message, want_keys: set[str]) -> dict[str, Any]:
    """The spec as Talos's YAML shows it after decoding: set fields, plus zero enums we also show."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        key = yaml_key(fd)
        value = getattr(msg, fd.name)
        if fd.type == _FD.TYPE_MESSAGE:
            if fd.is_repeated:
                items = list(value)
            elif msg.HasField(fd.name):
                items = [value]
            else:
                continue
            conv = [address_message(v) for v in items]
            decoded = [
                c if c is not None else talos_view(v, set(v.DESCRIPTOR.fields_by_name))
                for c, v in zip(conv, items, strict=True)
            ]
            out[key] = decoded if fd.is_repeated else decoded[0]
        elif fd.type == _FD.TYPE_ENUM:
            if fd.is_repeated:
                out[key] = [enum_text(fd, v) for v in value]
            elif value or key in want_keys:
                out[key] = enum_text(fd, value)
        elif fd.full_name in FLAGS:
            out[key] = ",".join(n for bit, n in sorted(FLAGS[fd.full_name].items()) if value & bit)
        elif fd.name in HW_ADDRS:
            out[key] = ":".join(f"{b:02x}" for b in value)
        else:
            out[key] = list(value) if fd.is_repeated else value
    return out


def normal(value: Any) -> Any:
    """Zero values dropped (protoenc leaves them out, and so does the decoded view)."""
    if isinstance(value, dict):
        out = {k: normal(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, "", [], {}, 0, False)}
    if isinstance(value, list):
        return [normal(v) for v in value]
    return value


def talos_keys(desc: descriptor.Descriptor) -> set[str]:
    return {yaml_key(fd) for fd in desc.fields}


def check(type_: str, r: Resource) -> dict[str, Any]:
    """Encode through the API conversion, decode as talosctl; assert the fields match yaml_spec."""
    out = resource(r)
    assert out.spec.yaml_spec == (r.spec.yaml_text() if hasattr(r.spec, "yaml_text") else r.yaml_spec)
    codec = protospec.PROTO_SPECS[type_]
    assert isinstance(codec, protospec.Schema)
    msg = codec.message.FromString(out.spec.proto_spec)
    data = yaml.safe_load(out.spec.yaml_spec)
    assert codec.ours.isdisjoint(talos_keys(msg.DESCRIPTOR)), "a key declared ours is Talos's"
    unknown = set(data) - talos_keys(msg.DESCRIPTOR) - codec.ours
    assert not unknown, f"{type_}: YAML keys neither in Talos's {msg.DESCRIPTOR.full_name} nor declared ours"
    talos_data = {k: v for k, v in data.items() if k not in codec.ours}
    view = talos_view(msg, set(talos_data))
    assert normal(view) == normal(talos_data)
    return view


LINK = {
    "index": 2,
    "ifi_type": 1,
    "IFLA_IFNAME": "eth0",
    "flags": 0x11043,
    "IFLA_ADDRESS": "52:54:00:12:34:56",
    "IFLA_BROADCAST": "ff:ff:ff:ff:ff:ff",
    "IFLA_MTU": 1500,
    "IFLA_QDISC": "fq_codel",
    "IFLA_OPERSTATE": "UP",
    "IFLA_CARRIER": 1,
}
NAMES = {1: "lo", 2: "eth0", 3: "kubespan"}


def _mc() -> MachineConfig:
    return MachineConfig.parse(config_yaml(cluster_id="cid", machine_type="controlplane"))


# one or more specs per served type, made by the code that makes them in machined where it is a function
SAMPLES: dict[str, list[Callable[[], Any]]] = {
    "ResourceDefinitions.meta.cosi.dev": [lambda d=d: d for d in DEFINITIONS],
    "MachineConfigs.config.talos.dev": [lambda: MachineConfigSpec(_mc())],
    "KubeSpanConfigs.kubespan.talos.dev": [lambda: kubespan_config_spec(_mc())],
    "KubeSpanIdentities.kubespan.talos.dev": [
        lambda: {
            "address": "fd7a:115c:a1e0:ab12:4843:cd96:6293:1a2b/128",
            "subnet": "fd7a:115c:a1e0:ab12::/64",
            "privateKey": "cHJpdmF0ZQ==",
            "publicKey": "cHVibGlj",
        }
    ],
    "KubeSpanPeerSpecs.kubespan.talos.dev": [
        lambda: {
            "address": "fd7a:115c:a1e0:ab12:4843:cd96:6293:1a2c",
            "allowedIPs": ["fd7a:115c:a1e0:ab12:4843:cd96:6293:1a2c/128", "10.2.0.11/32"],
            "label": "n2",
            "endpoints": ["198.51.100.12:51820", "[2001:db8::1]:51821"],
        },
        lambda: {"address": "", "allowedIPs": [], "label": "lonely", "endpoints": []},
    ],
    "KubeSpanPeerStatuses.kubespan.talos.dev": [
        lambda: {
            "label": "n2",
            "endpoint": "198.51.100.12:51820",
            "state": "up",
            "receiveBytes": 1234,
            "transmitBytes": 5678,
            "lastHandshakeTime": "2026-12-06T15:00:01Z",
            "lastUsedEndpoint": "198.51.100.12:51820",
            "lastEndpointChange": "2026-12-06T14:59:58Z",
            "natClass": "eim",
            "path": "direct",
            "relayVia": "",
            "whyNotDirect": "",
            "connectTime": 0.42,
        },
        lambda: {
            "label": "n3",
            "endpoint": "",
            "state": "unknown",
            "receiveBytes": 0,
            "transmitBytes": 0,
            "lastHandshakeTime": None,
            "lastUsedEndpoint": "",
            "lastEndpointChange": None,
            "natClass": "",
            "path": "none",
            "relayVia": "",
            "whyNotDirect": "no endpoints",
            "connectTime": None,
        },
    ],
    "KubeSpanEndpoints.kubespan.talos.dev": [
        lambda: {
            "affiliateID": "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC",
            "endpoint": "[2001:db8::2]:51820",
        }
    ],
    "KubeSpanNATStatuses.kubespan.talos.dev": [
        lambda: {"natClass": "eim", "mappedEndpoint": "198.51.100.11:51820"}
    ],
    "Affiliates.cluster.talos.dev": [
        lambda: _affiliate_spec(
            "node-a",
            hostname="n1.example",
            nodename="n1",
            machine_type="controlplane",
            operating_system="Debian GNU/Linux 13",
            addresses=[ipaddress.ip_address("10.1.0.11"), ipaddress.ip_address("fd7a:115c:a1e0:ab12::1")],
            public_key="cHVibGlj",
            mesh_address=ipaddress.ip_address("fd7a:115c:a1e0:ab12:4843:cd96:6293:1a2b"),
            additional=[ipaddress.ip_network("10.244.0.0/24")],
            endpoints=["10.1.0.11:51820", "[2001:db8::5]:51820"],
        ),
        lambda: _affiliate_spec(
            "node-b",
            hostname="n2",
            nodename="",
            machine_type="worker",
            operating_system="",
            addresses=[],
            public_key=None,
            mesh_address=None,
            additional=[],
            endpoints=[],
        ),
    ],
    "Identities.cluster.talos.dev": [lambda: {"nodeId": "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC"}],
    "Members.cluster.talos.dev": [
        lambda: {
            "nodeId": "node-a",
            "addresses": ["10.1.0.11", "fd7a:115c:a1e0:ab12::1"],
            "hostname": "n1",
            "machineType": "controlplane",
            "operatingSystem": "Debian GNU/Linux 13",
        },
        lambda: {
            "nodeId": "node-b",
            "addresses": [],
            "hostname": "n2",
            "machineType": "worker",
            "operatingSystem": "",
            "controlPlane": {"port": 6443},
        },
    ],
    "LinkStatuses.net.talos.dev": [
        lambda: link_spec(LINK)[1],
        lambda: link_spec(
            {
                "index": 1,
                "ifi_type": 772,
                "IFLA_IFNAME": "lo",
                "flags": 0x49,
                "IFLA_ADDRESS": "00:00:00:00:00:00",
                "IFLA_MTU": 65536,
                "IFLA_OPERSTATE": "UNKNOWN",
                "IFLA_CARRIER": 1,
            }
        )[1],
        lambda: link_spec(
            {
                "index": 3,
                "ifi_type": 65534,
                "IFLA_IFNAME": "kubespan",
                "flags": 0x10091,
                "IFLA_MTU": 1420,
                "IFLA_OPERSTATE": "UNKNOWN",
                "IFLA_LINKINFO": {"IFLA_INFO_KIND": "wireguard"},
            }
        )[1],
        lambda: link_spec(
            {
                "index": 4,
                "ifi_type": 999,
                "IFLA_IFNAME": "odd",
                "flags": 0,
                "IFLA_OPERSTATE": "LOWERLAYERDOWN",
            }
        )[1],
    ],
    "AddressStatuses.net.talos.dev": [
        lambda: address_spec(
            {
                "index": 2,
                "family": 2,
                "prefixlen": 24,
                "IFA_LOCAL": "10.1.0.11",
                "IFA_ADDRESS": "10.1.0.11",
                "IFA_BROADCAST": "10.1.0.255",
                "IFA_FLAGS": 0x80,
                "scope": 0,
            },
            NAMES,
        )[1],
        lambda: address_spec(
            {
                "index": 3,
                "family": 10,
                "prefixlen": 128,
                "IFA_ADDRESS": "fd7a:115c:a1e0:ab12::1",
                "IFA_FLAGS": 0,
                "scope": 0,
            },
            NAMES,
        )[1],
        lambda: address_spec(
            {
                "index": 1,
                "family": 2,
                "prefixlen": 8,
                "IFA_LOCAL": "127.0.0.1",
                "IFA_FLAGS": 0x80,
                "scope": 254,
            },
            NAMES,
        )[1],
    ],
    "RouteStatuses.net.talos.dev": [
        lambda: route_spec(
            {
                "family": 2,
                "RTA_TABLE": 254,
                "RTA_GATEWAY": "10.1.0.1",
                "RTA_OIF": 2,
                "RTA_PRIORITY": 100,
                "proto": 4,
                "type": 1,
                "scope": 0,
            },
            NAMES,
        )[1],
        lambda: route_spec(
            {
                "family": 10,
                "RTA_DST": "fd7a:115c:a1e0:ab12::",
                "dst_len": 64,
                "RTA_TABLE": 180,
                "RTA_OIF": 3,
                "proto": 186,
                "type": 1,
                "scope": 253,
                "RTA_PREFSRC": "fd7a:115c:a1e0:ab12::1",
            },
            NAMES,
        )[1],
        lambda: route_spec(
            {
                "family": 2,
                "RTA_DST": "127.0.0.0",
                "dst_len": 8,
                "RTA_TABLE": 255,
                "RTA_OIF": 1,
                "proto": 2,
                "type": 2,
                "scope": 254,
            },
            NAMES,
        )[1],
    ],
    "NodeAddresses.net.talos.dev": [
        lambda: {"addresses": ["10.1.0.11/24", "fd7a:115c:a1e0:ab12::1/128"], "sortAlgorithm": "v1"},
        lambda: {"addresses": []},
    ],
    "Services.v1alpha1.talos.dev": [
        lambda: service_spec(ServiceState.RUNNING, True, False, True),
        lambda: service_spec(ServiceState.WAITING, False, True, True),
    ],
    "MachineStatuses.runtime.talos.dev": [
        lambda: {"stage": "running", "status": {"ready": True, "unmetConditions": []}},
        lambda: {
            "stage": "booting",
            "status": {
                "ready": False,
                "unmetConditions": [
                    {"name": "stage", "reason": "machined is booting"},
                    {"name": "mesh", "reason": "peers not up: n2"},
                ],
            },
        },
        lambda: {"stage": "shuttingDown", "status": {"ready": False, "unmetConditions": []}},
    ],
}


def served_types() -> list[str]:
    return [d.type for d in DEFINITIONS]


def test_every_served_type_has_a_proto_spec_mapping_and_samples() -> None:
    missing = [t for t in served_types() if t not in protospec.PROTO_SPECS]
    assert not missing, f"types served without a proto_spec mapping (machined/api/protospec.py): {missing}"
    assert not [t for t in served_types() if t not in SAMPLES], "add samples for the new type here"


def _cases() -> list[tuple[str, int]]:
    return [(t, i) for t in served_types() for i in range(len(SAMPLES.get(t, ())))]


@pytest.mark.parametrize(("type_", "i"), _cases())
def test_proto_spec_decodes_to_the_yaml_spec_fields(type_: str, i: int) -> None:
    d = next(x for x in DEFINITIONS if x.type == type_)
    r = Resource.new(d.default_namespace, type_, f"id{i}", SAMPLES[type_][i]())
    codec = protospec.PROTO_SPECS[type_]
    if isinstance(codec, protospec.OursOnly):
        assert resource(r).spec.proto_spec == b"" and resource(r).spec.yaml_spec
        return
    if isinstance(codec, protospec.Raw):
        out = resource(r)
        spec = config_pb2.MachineConfigSpec.FromString(out.spec.proto_spec)
        assert list(yaml.safe_load_all(spec.yaml_marshalled)) == list(yaml.safe_load_all(out.spec.yaml_spec))
        assert spec.yaml_marshalled.decode() == out.spec.yaml_spec
        return
    view = check(type_, r)
    assert view, "nothing decoded"


def test_wire_bytes_of_one_peer_status_are_talos_field_numbers() -> None:
    """Hand-checked wire bytes: field 1 NetIPPort{ip=1, port=2}, 2 label, 3 state enum, 4 rx varint."""
    data = {"endpoint": "10.0.0.1:51820", "label": "n", "state": "up", "receiveBytes": 5}
    got = protospec.PROTO_SPECS["KubeSpanPeerStatuses.kubespan.talos.dev"].encode(data)  # type: ignore[union-attr]
    ep = b"\x0a\x04\x0a\x00\x00\x01" + b"\x10\xec\x94\x03"  # ip 10.0.0.1, port 51820 (0xca6c) varint
    assert got == b"\x0a" + bytes([len(ep)]) + ep + b"\x12\x01n" + b"\x18\x01" + b"\x20\x05"


def test_resource_definitions_decode_as_talosctl_resolves_them() -> None:
    """talosctl finds ``members`` in the definitions' aliases, namespaces and columns (proto_spec)."""
    d = next(x for x in DEFINITIONS if x.type == "Members.cluster.talos.dev")
    r = Resource.new("meta", "ResourceDefinitions.meta.cosi.dev", d.id, d)
    spec = meta_pb2.ResourceDefinitionSpec.FromString(resource(r).spec.proto_spec)
    assert spec.resource_type == d.type and spec.default_namespace == "cluster"
    assert "members" in spec.all_aliases and "member" in spec.all_aliases
    assert [(c.name, c.json_path) for c in spec.print_columns][:2] == [
        ("Hostname", "{.hostname}"),
        ("Machine Type", "{.machineType}"),
    ]
    ident = next(x for x in DEFINITIONS if x.type == "KubeSpanIdentities.kubespan.talos.dev")
    s = meta_pb2.ResourceDefinitionSpec.FromString(
        resource(Resource.new("meta", "ResourceDefinitions.meta.cosi.dev", ident.id, ident)).spec.proto_spec
    )
    assert s.sensitivity == meta_pb2.ResourceDefinitionSpec.SENSITIVE


@pytest.mark.parametrize(
    ("type_", "data", "needle"),
    [
        ("KubeSpanPeerStatuses.kubespan.talos.dev", {"endpoint": "nonsense"}, "endpoint"),
        ("KubeSpanPeerSpecs.kubespan.talos.dev", {"allowedIPs": ["10.0.0.1"]}, "allowedIPs[0]"),
        ("Members.cluster.talos.dev", {"machineType": "toaster"}, "machineType"),
        ("LinkStatuses.net.talos.dev", {"flags": "UP,WARP"}, "flags"),
        ("Services.v1alpha1.talos.dev", {"running": "yes"}, "running"),
    ],
)
def test_a_value_that_does_not_fit_names_the_type_and_field(type_: str, data: Any, needle: str) -> None:
    with pytest.raises(protospec.ProtoSpecError) as e:
        protospec.encode(type_, data, lambda: data)
    assert type_ in str(e.value) and needle in str(e.value)


def test_a_bad_value_leaves_proto_spec_empty_but_yaml_spec_served(caplog: pytest.LogCaptureFixture) -> None:
    r = Resource.new("kubespan", "KubeSpanPeerStatuses.kubespan.talos.dev", "k", {"endpoint": "nonsense"})
    out = resource(r)
    assert out.spec.proto_spec == b"" and yaml.safe_load(out.spec.yaml_spec) == {"endpoint": "nonsense"}
    assert "endpoint" in caplog.text


def test_a_type_without_mapping_is_an_error() -> None:
    with pytest.raises(protospec.ProtoSpecError, match="no proto_spec mapping"):
        protospec.encode("Frobs.example.com", {}, dict)


def test_peer_status_keys_of_ours_stay_out_of_proto_spec() -> None:
    data = {"label": "n", "path": "relay", "relayVia": "n9", "connectTime": 1.5}
    raw = protospec.encode("KubeSpanPeerStatuses.kubespan.talos.dev", data, lambda: data)
    msg = kubespan_pb2.PeerStatusSpec.FromString(raw)
    assert msg.label == "n" and msg.SerializeToString() == raw  # nothing but Talos's fields

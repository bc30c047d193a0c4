"""proto_spec: every served type's spec decodes, the way talosctl decodes it (Talos's message for the
type, field by number), to the same fields as its yaml_spec.

The decoding (machined/api/protospec_testing.py) is independent of protospec.py's encoding tables: YAML
keys come from Talos's ``yaml:`` struct tags, enum texts from the value names in Talos's enums.proto,
addresses from the raw bytes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from machined.api import protospec
from machined.api.convert import resource
from machined.api.protospec_testing import check_wire
from machined.config import MachineConfig
from machined.config.testing import config_yaml
from machined.controllers.cluster import _affiliate_spec
from machined.controllers.config import MachineConfigSpec, kubespan_config_spec
from machined.controllers.runtime import service_spec
from machined.daemon.netinfo import address_spec, link_spec, route_spec
from machined.services import ServiceState
from machined.state import DEFINITIONS, Resource
from spanapi.talos.cosi import meta_pb2
from spanapi.talos.resource.config import config_pb2
from spanapi.talos.resource.definitions.kubespan import kubespan_pb2

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
            "rtt": 0.0123,
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
            "rtt": None,
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


def check(type_: str, r: Resource) -> dict[str, Any]:
    """Through the API conversion (yaml_spec as before), then decoded as talosctl decodes it."""
    out = resource(r)
    assert out.spec.yaml_spec == (r.spec.yaml_text() if hasattr(r.spec, "yaml_text") else r.yaml_spec)
    assert out.metadata.type == type_
    return check_wire(out)


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
    data = {"label": "n", "path": "relay", "relayVia": "n9", "connectTime": 1.5, "rtt": 0.02}
    raw = protospec.encode("KubeSpanPeerStatuses.kubespan.talos.dev", data, lambda: data)
    msg = kubespan_pb2.PeerStatusSpec.FromString(raw)
    assert msg.label == "n" and msg.SerializeToString() == raw  # nothing but Talos's fields


# Talos's field numbers (api/resource/definitions/*/*.proto at ad8823176e75, cosi-project meta.proto, Talos's
# api/common and api/resource/config): a second record, so an edit of our .proto files that moves a
# number fails here, not only on a real talosctl.
TALOS_FIELDS = {
    "talos.resource.definitions.kubespan.ConfigSpec": "enabled=1 cluster_id=2 shared_secret=3 force_routing=4 advertise_kubernetes_networks=5 mtu=6 endpoint_filters=7 harvest_extra_endpoints=8 extra_endpoints=9 exclude_advertised_networks=10",
    "talos.resource.definitions.kubespan.EndpointSpec": "affiliate_id=1 endpoint=2",
    "talos.resource.definitions.kubespan.IdentitySpec": "address=1 subnet=2 private_key=3 public_key=4",
    "talos.resource.definitions.kubespan.PeerSpecSpec": "address=1 allowed_ips=2 endpoints=3 label=4",
    "talos.resource.definitions.kubespan.PeerStatusSpec": "endpoint=1 label=2 state=3 receive_bytes=4 transmit_bytes=5 last_handshake_time=6 last_used_endpoint=7 last_endpoint_change=8",
    "talos.resource.definitions.cluster.AffiliateSpec": "node_id=1 addresses=2 hostname=3 nodename=4 operating_system=5 machine_type=6 kube_span=7 control_plane=8",
    "talos.resource.definitions.cluster.ControlPlane": "api_server_port=1",
    "talos.resource.definitions.cluster.IdentitySpec": "node_id=1",
    "talos.resource.definitions.cluster.KubeSpanAffiliateSpec": "public_key=1 address=2 additional_addresses=3 endpoints=4 exclude_advertised_networks=5",
    "talos.resource.definitions.cluster.MemberSpec": "node_id=1 addresses=2 hostname=3 machine_type=4 operating_system=5 control_plane=6",
    "talos.resource.definitions.network.AddressStatusSpec": "address=1 local=2 broadcast=3 anycast=4 multicast=5 link_index=6 link_name=7 family=8 scope=9 flags=10 priority=11",
    "talos.resource.definitions.network.LinkStatusSpec": "index=1 type=2 link_index=3 flags=4 hardware_addr=5 broadcast_addr=6 mtu=7 queue_disc=8 master_index=9 operational_state=10 kind=11 slave_kind=12 bus_path=13 pciid=14 driver=15 driver_version=16 firmware_version=17 product_id=18 vendor_id=19 product=20 vendor=21 link_state=22 speed_megabits=23 port=24 duplex=25 permanent_addr=30 alias=31 alt_names=32",
    "talos.resource.definitions.network.NodeAddressSpec": "addresses=1 sort_algorithm=2",
    "talos.resource.definitions.network.RouteNextHop": "gateway=1 out_link_name=2 weight=3",
    "talos.resource.definitions.network.RouteStatusSpec": "family=1 destination=2 source=3 gateway=4 out_link_index=5 out_link_name=6 table=7 priority=8 scope=9 type=10 flags=11 protocol=12 mtu=13 next_hops=14",
    "talos.resource.definitions.runtime.MachineStatusSpec": "stage=1 status=2",
    "talos.resource.definitions.runtime.MachineStatusStatus": "ready=1 unmet_conditions=2",
    "talos.resource.definitions.runtime.UnmetCondition": "name=1 reason=2",
    "talos.resource.definitions.v1alpha1.ServiceSpec": "running=1 healthy=2 unknown=3",
    "cosi.resource.meta.ResourceDefinitionSpec": "resource_type=1 display_type=2 default_namespace=3 aliases=4 all_aliases=5 print_columns=6 sensitivity=7",
    "cosi.resource.meta.ResourceDefinitionSpec.PrintColumn": "name=1 json_path=2",
    "resource.config.MachineConfigSpec": "yaml_marshalled=1",
    "common.NetIP": "ip=1",
    "common.NetIPPort": "ip=1 port=2",
    "common.NetIPPrefix": "ip=1 prefix_length=2",
}


@pytest.mark.parametrize("name", sorted(TALOS_FIELDS))
def test_messages_have_talos_field_numbers(name: str) -> None:
    from google.protobuf import descriptor_pool

    desc = descriptor_pool.Default().FindMessageTypeByName(name)
    got = " ".join(f"{f.name}={f.number}" for f in sorted(desc.fields, key=lambda f: f.number))
    assert got == TALOS_FIELDS[name]


def test_every_mapped_message_is_checked_for_field_numbers() -> None:
    seen: set[str] = set()

    def walk(s: protospec.Schema) -> None:
        seen.add(s.message.DESCRIPTOR.full_name)
        for inner in s.nested.values():
            walk(inner)

    for codec in protospec.PROTO_SPECS.values():
        if isinstance(codec, protospec.Schema):
            walk(codec)
        elif isinstance(codec, protospec.Raw):
            seen.add(codec.message.DESCRIPTOR.full_name)
    assert seen <= set(TALOS_FIELDS)


def test_a_bad_value_is_logged_once_not_per_reply(caplog: pytest.LogCaptureFixture) -> None:
    r = Resource.new("kubespan", "KubeSpanPeerStatuses.kubespan.talos.dev", "once", {"endpoint": "bogus"})
    for _ in range(3):
        resource(r)
    assert caplog.text.count("kubespan/once") == 1

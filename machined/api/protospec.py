"""``proto_spec`` of the resource API: each served type's spec in the protobuf message Talos uses for it.

talosctl decodes the specs of every type Talos registers from ``proto_spec`` (not ``yaml_spec``), and
resource definitions too (it resolves ``talosctl get members`` against them). So every reply carries
both: ``yaml_spec`` as before, and ``proto_spec`` encoded here from the same spec data.

* ``ResourceDefinitions.meta.cosi.dev``: ``cosi.resource.meta.ResourceDefinitionSpec``.
* ``MachineConfigs.config.talos.dev``: ``resource.config.MachineConfigSpec``, the config's YAML bytes.
* Talos's other types: the ``talos.resource.definitions.<group>`` messages (``proto/spanapi/talos/
  resource/definitions``), with Talos's field numbers. Talos fills them with protoenc from its Go spec
  structs; protoenc leaves zero values out, and so do we (an empty string, list or absent value is not
  sent). Addresses go as ``common.NetIP``/``NetIPPort``/``NetIPPrefix`` (raw address bytes), times as
  ``google.protobuf.Timestamp``, enums and flag sets as the kernel's / Talos's numbers.
* Types of ours alone (``KubeSpanNATStatuses``) have no Talos message: ``proto_spec`` stays empty and
  talosctl shows their ``yaml_spec`` (it falls back to it for types it does not register).

:data:`PROTO_SPECS` maps every served type name to its :class:`Schema` (or :class:`Raw` encoder, or
:class:`OursOnly`); a served type missing from it fails ``tests/unit/machined/test_protospec.py``. A schema
names the YAML key of each proto field where it is not the field's camelCase (Talos's ``yaml:`` tags)
and the YAML keys that are ours alone (not in Talos's spec, so not in ``proto_spec``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor, message, timestamp_pb2

from spanapi.talos.cosi import meta_pb2
from spanapi.talos.resource.config import config_pb2
from spanapi.talos.resource.definitions.cluster import cluster_pb2
from spanapi.talos.resource.definitions.kubespan import kubespan_pb2
from spanapi.talos.resource.definitions.network import network_pb2
from spanapi.talos.resource.definitions.runtime import runtime_pb2
from spanapi.talos.resource.definitions.v1alpha1 import v1alpha1_pb2
from spanutil.hostport import split_host_port
from spanutil.ipcodec import ip_without_scope

_FD = descriptor.FieldDescriptor


class ProtoSpecError(ValueError):
    """A spec value that cannot be put into its Talos message (names the type and the field)."""


# Our YAML text of each Talos enum -> its number (Talos's enums.proto; the kernel's numbers where the
# enum mirrors one). A decimal string is taken as the number itself (netlink values we have no name for).
ENUM_TEXT: dict[str, dict[str, int]] = {
    "talos.resource.definitions.enums.KubespanPeerState": {"unknown": 0, "up": 1, "down": 2},
    "talos.resource.definitions.enums.MachineType": {
        "unknown": 0,
        "init": 1,
        "controlplane": 2,
        "worker": 3,
    },
    "talos.resource.definitions.enums.RuntimeMachineStage": {
        "unknown": 0,
        "booting": 1,
        "installing": 2,
        "maintenance": 3,
        "running": 4,
        "rebooting": 5,
        "shuttingDown": 6,
        "resetting": 7,
        "upgrading": 8,
    },
    "talos.resource.definitions.enums.NethelpersFamily": {"inet4": 2, "inet6": 10},
    "talos.resource.definitions.enums.NethelpersScope": {
        "global": 0,
        "site": 200,
        "link": 253,
        "host": 254,
        "nowhere": 255,
    },
    # the names machined.daemon.netinfo gives ARPHRD_* numbers
    "talos.resource.definitions.enums.NethelpersLinkType": {
        "netrom": 0,
        "ether": 1,
        "ipip": 768,
        "loopback": 772,
        "sit": 776,
        "ip6gre": 823,
        "none": 65534,
    },
    # pyroute2's IF_OPER_* names, lower-cased
    "talos.resource.definitions.enums.NethelpersOperationalState": {
        "unknown": 0,
        "notpresent": 1,
        "down": 2,
        "lowerlayerdown": 3,
        "testing": 4,
        "dormant": 5,
        "up": 6,
    },
    "talos.resource.definitions.enums.NethelpersRoutingTable": {"default": 253, "main": 254, "local": 255},
    "talos.resource.definitions.enums.NethelpersRouteType": {
        "unspecified": 0,
        "unicast": 1,
        "local": 2,
        "broadcast": 3,
        "anycast": 4,
        "multicast": 5,
        "blackhole": 6,
        "unreachable": 7,
        "prohibit": 8,
        "throw": 9,
        "nat": 10,
    },
    "talos.resource.definitions.enums.NethelpersRouteProtocol": {
        "unspecified": 0,
        "redirect": 1,
        "kernel": 2,
        "boot": 3,
        "static": 4,
        "ra": 9,
        "dhcp": 16,
        "keepalived": 18,
        "babel": 42,
        "bgp": 186,
        "isis": 187,
        "ospf": 188,
        "rip": 189,
    },
    "talos.resource.definitions.enums.NethelpersAddressSortAlgorithm": {"v1": 0, "v2": 1},
    "cosi.resource.meta.ResourceDefinitionSpec.Sensitivity": {"non-sensitive": 0, "sensitive": 1},
}

# Flag sets our YAML shows as comma-separated names; proto_spec carries the bits.
LINK_FLAGS: dict[str, int] = {  # IFF_* (linux/if.h)
    "UP": 0x1,
    "BROADCAST": 0x2,
    "DEBUG": 0x4,
    "LOOPBACK": 0x8,
    "POINTOPOINT": 0x10,
    "NOTRAILERS": 0x20,
    "RUNNING": 0x40,
    "NOARP": 0x80,
    "PROMISC": 0x100,
    "ALLMULTI": 0x200,
    "MASTER": 0x400,
    "SLAVE": 0x800,
    "MULTICAST": 0x1000,
    "PORTSEL": 0x2000,
    "AUTOMEDIA": 0x4000,
    "DYNAMIC": 0x8000,
    "LOWER_UP": 0x10000,
    "DORMANT": 0x20000,
    "ECHO": 0x40000,
}
ADDRESS_FLAGS: dict[str, int] = {  # IFA_F_* (linux/if_addr.h), as Talos's NethelpersAddressFlag
    "temporary": 0x1,
    "nodad": 0x2,
    "optimistic": 0x4,
    "dadfailed": 0x8,
    "homeaddress": 0x10,
    "deprecated": 0x20,
    "tentative": 0x40,
    "permanent": 0x80,
    "managetempaddr": 0x100,
    "noprefixroute": 0x200,
    "mcautojoin": 0x400,
    "stableprivacy": 0x800,
}


def flag_bits(names: Mapping[str, int]) -> Callable[[Any], int]:
    """A converter from ``"A,B"`` (or a number) to the OR of the named bits."""

    def convert(value: Any) -> int:
        if isinstance(value, int):
            return value
        bits = 0
        for name in str(value).split(","):
            name = name.strip()
            if not name:
                continue
            if name.isdigit():
                bits |= int(name)
            elif name in names:
                bits |= names[name]
            else:
                raise ValueError(f"unknown flag {name!r}")
        return bits

    return convert


def hardware_addr(value: Any) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` (any length) -> the address bytes, as Talos's ``nethelpers.HardwareAddr``."""
    text = str(value).replace(":", "").replace("-", "")
    return bytes.fromhex(text)


@dataclass(frozen=True, slots=True)
class Schema:
    """How one spec's YAML data fills one Talos message.

    ``keys``: proto field name -> YAML key, where it is not the camelCase of the field name.
    ``convert``: proto field name -> converter of the YAML value (flag sets, hardware addresses).
    ``nested``: proto field name -> the schema of a message-typed field (other than the address
    and time messages, which are converted by type).
    ``ours``: YAML keys of ours alone, not in Talos's spec (left out of ``proto_spec``).
    """

    message: type[message.Message]
    keys: Mapping[str, str] = field(default_factory=dict)
    convert: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    nested: Mapping[str, Schema] = field(default_factory=dict)
    ours: frozenset[str] = frozenset()

    def yaml_key(self, name: str) -> str:
        return self.keys.get(name) or _camel(name)

    def encode(self, data: Any) -> bytes:
        msg = self.message()
        _fill(msg, self, data, "")
        return msg.SerializeToString()


@dataclass(frozen=True, slots=True)
class Raw:
    """A spec that is not a mapping of fields: ``encode`` gets the resource's spec object."""

    message: type[message.Message]
    encode_spec: Callable[[Any], message.Message]

    def encode(self, spec: Any) -> bytes:
        return self.encode_spec(spec).SerializeToString()


@dataclass(frozen=True, slots=True)
class OursOnly:
    """A type Talos does not have: no ``proto_spec`` (talosctl shows ``yaml_spec``)."""

    reason: str


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, tuple, dict)) and not value)


def _ip(value: Any) -> bytes:
    return ipaddress.ip_address(str(value)).packed


def _ip_port(value: Any) -> tuple[bytes, int]:
    host, port = split_host_port(str(value), what="endpoint", port_zero=True)
    return ip_without_scope(host).packed, port


def _prefix(value: Any) -> tuple[bytes, int]:
    text = str(value)
    if "/" not in text:
        raise ValueError("expected ADDRESS/LENGTH")
    iface = ipaddress.ip_interface(text)  # keeps the host bits, as netip.Prefix does
    return iface.ip.packed, iface.network.prefixlen


def _enum(fd: descriptor.FieldDescriptor, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an enum name")
    if isinstance(value, int):
        return value
    text = str(value)
    table = ENUM_TEXT.get(fd.enum_type.full_name, {})
    if text in table:
        return table[text]
    if text.isdigit():
        return int(text)
    raise ValueError(f"unknown {fd.enum_type.name} {text!r}")


def _message_value(
    target: message.Message, fd: descriptor.FieldDescriptor, schema: Schema, value: Any, path: str
) -> None:
    name = fd.message_type.full_name
    if name == "common.NetIP":
        target.ip = _ip(value)  # type: ignore[attr-defined]
    elif name == "common.NetIPPort":
        target.ip, target.port = _ip_port(value)  # type: ignore[attr-defined]
    elif name == "common.NetIPPrefix":
        target.ip, target.prefix_length = _prefix(value)  # type: ignore[attr-defined]
    elif name == "google.protobuf.Timestamp":
        assert isinstance(target, timestamp_pb2.Timestamp)
        target.FromJsonString(str(value))
    else:
        inner = schema.nested.get(fd.name)
        if inner is None:
            raise ValueError(f"no schema for message {name}")
        _fill(target, inner, value, path)


def _scalar(fd: descriptor.FieldDescriptor, schema: Schema, value: Any) -> Any:
    conv = schema.convert.get(fd.name)
    if conv is not None:
        return conv(value)
    if fd.type == _FD.TYPE_ENUM:
        return _enum(fd, value)
    if fd.type == _FD.TYPE_BOOL:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if fd.type == _FD.TYPE_STRING:
        return str(value)
    if fd.type == _FD.TYPE_BYTES:
        return value if isinstance(value, bytes) else str(value).encode()
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an integer")
    return value


def _fill(msg: message.Message, schema: Schema, data: Any, path: str) -> None:
    if not isinstance(data, Mapping):
        raise ProtoSpecError(f"{path or 'spec'}: expected a mapping, got {type(data).__name__}")
    for fd in msg.DESCRIPTOR.fields:
        key = schema.yaml_key(fd.name)
        value = data.get(key)
        if _empty(value):
            continue
        where = f"{path}.{key}" if path else key
        if not fd.is_repeated:
            _put(msg, fd, schema, value, where)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                _put(msg, fd, schema, v, f"{where}[{i}]")
        else:
            raise ProtoSpecError(f"{where} ({fd.full_name}): expected a list")


def _put(
    msg: message.Message, fd: descriptor.FieldDescriptor, schema: Schema, value: Any, where: str
) -> None:
    """One value (one element of a repeated field) into ``msg``; a misfit names the field."""
    try:
        if fd.type == _FD.TYPE_MESSAGE:
            target = getattr(msg, fd.name).add() if fd.is_repeated else getattr(msg, fd.name)
            _message_value(target, fd, schema, value, where)
        elif fd.is_repeated:
            getattr(msg, fd.name).append(_scalar(fd, schema, value))
        else:
            setattr(msg, fd.name, _scalar(fd, schema, value))
    except ProtoSpecError:
        raise
    except (ValueError, TypeError) as e:
        raise ProtoSpecError(f"{where} ({fd.full_name}): {e}") from None


def _machine_config(spec: Any) -> config_pb2.MachineConfigSpec:
    text = spec.yaml_text() if callable(getattr(spec, "yaml_text", None)) else str(spec)
    return config_pb2.MachineConfigSpec(yaml_marshalled=text.encode())


_CONTROL_PLANE = Schema(cluster_pb2.ControlPlane, keys={"api_server_port": "port"})

PROTO_SPECS: dict[str, Schema | Raw | OursOnly] = {
    "ResourceDefinitions.meta.cosi.dev": Schema(
        meta_pb2.ResourceDefinitionSpec,
        keys={"resource_type": "type"},
        nested={"print_columns": Schema(meta_pb2.ResourceDefinitionSpec.PrintColumn)},
        ours=frozenset({"singular"}),
    ),
    "MachineConfigs.config.talos.dev": Raw(config_pb2.MachineConfigSpec, _machine_config),
    "KubeSpanConfigs.kubespan.talos.dev": Schema(kubespan_pb2.ConfigSpec),
    "KubeSpanIdentities.kubespan.talos.dev": Schema(kubespan_pb2.IdentitySpec),
    "KubeSpanPeerSpecs.kubespan.talos.dev": Schema(
        kubespan_pb2.PeerSpecSpec, keys={"allowed_ips": "allowedIPs"}
    ),
    "KubeSpanPeerStatuses.kubespan.talos.dev": Schema(
        kubespan_pb2.PeerStatusSpec,
        # issue 14's path report, the NAT class the peer publishes, issue 17's probe round trip
        ours=frozenset({"natClass", "path", "relayVia", "whyNotDirect", "connectTime", "rtt"}),
    ),
    "KubeSpanEndpoints.kubespan.talos.dev": Schema(
        kubespan_pb2.EndpointSpec, keys={"affiliate_id": "affiliateID"}
    ),
    "KubeSpanNATStatuses.kubespan.talos.dev": OursOnly(
        "endpoint discovery (STUN) is ours; Talos has no such type"
    ),
    "Affiliates.cluster.talos.dev": Schema(
        cluster_pb2.AffiliateSpec,
        keys={"kube_span": "kubespan"},
        nested={
            "kube_span": Schema(cluster_pb2.KubeSpanAffiliateSpec),
            "control_plane": _CONTROL_PLANE,
        },
    ),
    "Identities.cluster.talos.dev": Schema(cluster_pb2.IdentitySpec),
    "Members.cluster.talos.dev": Schema(cluster_pb2.MemberSpec, nested={"control_plane": _CONTROL_PLANE}),
    "LinkStatuses.net.talos.dev": Schema(
        network_pb2.LinkStatusSpec,
        keys={
            "speed_megabits": "speedMbit",
            "pciid": "pciID",
            "product_id": "productID",
            "vendor_id": "vendorID",
        },
        convert={
            "flags": flag_bits(LINK_FLAGS),
            "hardware_addr": hardware_addr,
            "broadcast_addr": hardware_addr,
            "permanent_addr": hardware_addr,
        },
    ),
    "AddressStatuses.net.talos.dev": Schema(
        network_pb2.AddressStatusSpec, convert={"flags": flag_bits(ADDRESS_FLAGS)}
    ),
    "RouteStatuses.net.talos.dev": Schema(
        network_pb2.RouteStatusSpec,
        keys={"destination": "dst", "source": "src"},
        nested={"next_hops": Schema(network_pb2.RouteNextHop)},
    ),
    "NodeAddresses.net.talos.dev": Schema(network_pb2.NodeAddressSpec),
    "Services.v1alpha1.talos.dev": Schema(v1alpha1_pb2.ServiceSpec, ours=frozenset({"state"})),
    "MachineStatuses.runtime.talos.dev": Schema(
        runtime_pb2.MachineStatusSpec,
        nested={
            "status": Schema(
                runtime_pb2.MachineStatusStatus,
                nested={"unmet_conditions": Schema(runtime_pb2.UnmetCondition)},
            )
        },
    ),
}


def encode(type: str, spec: Any, data: Callable[[], Any]) -> bytes:
    """``proto_spec`` of one resource: ``spec`` is its spec object, ``data()`` its YAML data.

    Empty for types of ours alone. Raises :class:`ProtoSpecError` for a type without a mapping or a
    value that does not fit its field.
    """
    codec = PROTO_SPECS.get(type)
    if codec is None:
        raise ProtoSpecError(f"{type}: no proto_spec mapping (add it to machined/api/protospec.py)")
    if isinstance(codec, OursOnly):
        return b""
    if isinstance(codec, Raw):
        return codec.encode(spec)
    try:
        return codec.encode(data())
    except ProtoSpecError as e:
        raise ProtoSpecError(f"{type}: {e}") from None

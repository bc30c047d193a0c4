"""Decode ``proto_spec`` the way talosctl does, and compare it with ``yaml_spec`` (for tests).

talosctl unmarshals each Talos-registered type from ``proto_spec`` with Talos's message (protoenc,
field by number) and renders the Go struct with its ``yaml:`` tags. :func:`check_wire` does the same
with our copies of Talos's messages and asserts the result has the same fields as ``yaml_spec``.
It is independent of :mod:`machined.api.protospec`'s encoding tables: YAML keys come from Talos's
struct tags (:data:`TALOS_YAML_KEYS`, camelCase of the field name otherwise), enum texts from the
value names in Talos's enums.proto, addresses from the raw bytes. Only the type -> message choice and
the keys declared ours are taken from :data:`~machined.api.protospec.PROTO_SPECS`.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import yaml
from google.protobuf import descriptor, message

from machined.api import protospec
from machined.daemon.netinfo import _IFF
from spanapi.talos.cosi import resource_pb2
from spanapi.talos.resource.config import config_pb2

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


def check_wire(res: resource_pb2.Resource) -> dict[str, Any]:
    """Decode one reply's ``proto_spec`` as talosctl does; assert it holds the ``yaml_spec`` fields.

    Returns the decoded view (YAML keys -> values). Types of ours alone must have no ``proto_spec``;
    the machine config must carry the ``yaml_spec`` documents as its YAML bytes.
    """
    type_ = res.metadata.type
    codec = protospec.PROTO_SPECS.get(type_)
    assert codec is not None, f"{type_}: no proto_spec mapping"
    if isinstance(codec, protospec.OursOnly):
        assert res.spec.proto_spec == b"", f"{type_} is ours alone but carries a proto_spec"
        return {}
    if isinstance(codec, protospec.Raw):
        spec = config_pb2.MachineConfigSpec.FromString(res.spec.proto_spec)
        docs = list(yaml.safe_load_all(spec.yaml_marshalled))
        assert docs == list(yaml.safe_load_all(res.spec.yaml_spec)), f"{type_}: YAML bytes differ"
        return {"documents": docs}
    msg = codec.message.FromString(res.spec.proto_spec)
    data = yaml.safe_load(res.spec.yaml_spec)
    keys = talos_keys(msg.DESCRIPTOR)
    assert codec.ours.isdisjoint(keys), f"{type_}: a key declared ours is Talos's"
    unknown = set(data) - keys - codec.ours
    assert not unknown, f"{type_}: YAML keys {sorted(unknown)} neither in {msg.DESCRIPTOR.full_name} nor ours"
    talos_data = {k: v for k, v in data.items() if k not in codec.ours}
    view = talos_view(msg, set(talos_data))
    assert normal(view) == normal(talos_data), (
        f"{type_}/{res.metadata.id}: {normal(view)} != {normal(talos_data)}"
    )
    return view

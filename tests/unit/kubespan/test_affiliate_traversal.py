"""Our NAT-traversal extension of the affiliate: round trip, leniency, and Talos still decodes us.

The Talos-layout decoder below is built from the field numbers of Talos's ``affiliate.proto``
(discovery-api v0.1.8: Affiliate 1-8, KubeSpan 1-4) and nothing of ours, the way a Talos node's
generated code sees our bytes: it must read every Talos field unchanged and skip ``traversal``.
"""

from __future__ import annotations

import ipaddress

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from kubespan.affiliate import (
    MAX_PUNCH_INTENTS,
    NAT_CLASSES,
    LocalAffiliate,
    PunchIntent,
    RemoteAffiliate,
    Traversal,
    build_local_affiliate,
)
from kubespan.wireguard.types import PublicKey
from spanapi.discovery.client import affiliate_pb2

KEY = PublicKey(bytes(range(32)))
PEER = PublicKey(bytes(range(1, 33)))
MESH = ipaddress.IPv6Address("fd7a:115c:a1e0:ab12:4843:cd96:6200:1")


def _talos_affiliate_class() -> type:
    f = descriptor_pb2.FileDescriptorProto(
        name="talos_layout_affiliate.proto", package="talostest", syntax="proto3"
    )
    T = descriptor_pb2.FieldDescriptorProto
    prefix = f.message_type.add(name="IPPrefix")
    prefix.field.add(name="ip", number=1, type=T.TYPE_BYTES, label=T.LABEL_OPTIONAL)
    prefix.field.add(name="bits", number=2, type=T.TYPE_UINT32, label=T.LABEL_OPTIONAL)
    ks = f.message_type.add(name="KubeSpan")
    ks.field.add(name="public_key", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    ks.field.add(name="address", number=2, type=T.TYPE_BYTES, label=T.LABEL_OPTIONAL)
    for name, num in (("additional_addresses", 3), ("exclude_advertised_addresses", 4)):
        ks.field.add(
            name=name,
            number=num,
            type=T.TYPE_MESSAGE,
            type_name=".talostest.IPPrefix",
            label=T.LABEL_REPEATED,
        )
    cp = f.message_type.add(name="ControlPlane")
    cp.field.add(name="api_server_port", number=1, type=T.TYPE_UINT32, label=T.LABEL_OPTIONAL)
    aff = f.message_type.add(name="Affiliate")
    aff.field.add(name="node_id", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    aff.field.add(name="addresses", number=2, type=T.TYPE_BYTES, label=T.LABEL_REPEATED)
    for name, num in (("hostname", 3), ("nodename", 4), ("machine_type", 5), ("operating_system", 6)):
        aff.field.add(name=name, number=num, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    aff.field.add(
        name="kubespan",
        number=7,
        type=T.TYPE_MESSAGE,
        type_name=".talostest.KubeSpan",
        label=T.LABEL_OPTIONAL,
    )
    aff.field.add(
        name="control_plane",
        number=8,
        type=T.TYPE_MESSAGE,
        type_name=".talostest.ControlPlane",
        label=T.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("talostest.Affiliate"))


def _local(traversal: Traversal) -> LocalAffiliate:
    return build_local_affiliate(
        node_id="n1",
        nodename="node-1",
        hostname="node-1.lab",
        public_key=KEY,
        mesh_address=MESH,
        node_addresses=["192.0.2.10/24", "2001:db8::10/64"],
        listen_port=51820,
        advertised=["10.244.0.0/24"],
        machine_type="worker",
        operating_system="Linux",
        traversal=traversal,
    )


FULL = Traversal("edm", True, (PunchIntent(PEER, b"\x01" * 8, 1_800_000_000_123),))


def test_round_trip() -> None:
    local = _local(FULL)
    pb = affiliate_pb2.Affiliate.FromString(local.to_pb().SerializeToString())
    remote = RemoteAffiliate.from_pb(pb)
    assert remote.traversal == FULL
    assert remote.public_key == KEY


def test_empty_traversal_leaves_talos_bytes_unchanged() -> None:
    pb = _local(Traversal()).to_pb()
    assert not pb.kubespan.HasField("traversal")
    assert RemoteAffiliate.from_pb(pb).traversal == Traversal()


def test_talos_layout_decoder_reads_every_field_and_skips_ours() -> None:
    ours = _local(FULL).to_pb()
    plain = _local(Traversal()).to_pb()
    wire = ours.SerializeToString()
    assert len(wire) > len(plain.SerializeToString())  # the extension is really on the wire
    talos = _talos_affiliate_class().FromString(wire)
    # Every Talos field reads as if the extension did not exist.
    for name in ("node_id", "hostname", "nodename", "machine_type", "operating_system"):
        assert getattr(talos, name) == getattr(plain, name)
    assert list(talos.addresses) == list(plain.addresses)
    assert talos.kubespan.public_key == KEY.b64
    assert talos.kubespan.address == MESH.packed
    assert [(p.ip, p.bits) for p in talos.kubespan.additional_addresses] == [
        (p.ip, p.bits) for p in plain.kubespan.additional_addresses
    ]
    # Talos keeps ours only as unknown bytes; dropping them gives exactly the plain affiliate.
    talos.DiscardUnknownFields()
    assert talos.SerializeToString(deterministic=True) == plain.SerializeToString(deterministic=True)


def test_unknown_nat_class_and_bad_punches_are_dropped_not_fatal() -> None:
    pb = _local(Traversal()).to_pb()
    t = pb.kubespan.traversal
    t.nat_class = 7  # a class from a newer version
    t.relay = True
    t.punch.add(peer_public_key=b"short", candidates_hash=b"\x00" * 8, start_unix_ms=1)
    t.punch.add(peer_public_key=PEER.raw, candidates_hash=b"\x00" * 3, start_unix_ms=1)
    t.punch.add(peer_public_key=PEER.raw, candidates_hash=b"\x02" * 8, start_unix_ms=5)
    remote = RemoteAffiliate.from_pb(pb)
    assert remote.traversal == Traversal("unknown", True, (PunchIntent(PEER, b"\x02" * 8, 5),))


def test_punch_intents_are_bounded() -> None:
    many = tuple(PunchIntent(PEER, b"\x03" * 8, i) for i in range(MAX_PUNCH_INTENTS + 1))
    with pytest.raises(ValueError, match="punches: 17 is above the maximum 16"):
        Traversal(punches=many)
    pb = _local(Traversal()).to_pb()
    for p in many:
        pb.kubespan.traversal.punch.add(
            peer_public_key=p.peer.raw, candidates_hash=p.candidates_hash, start_unix_ms=p.start_ms
        )
    assert len(RemoteAffiliate.from_pb(pb).traversal.punches) == MAX_PUNCH_INTENTS


def test_nat_class_is_checked() -> None:
    with pytest.raises(ValueError, match="nat_class: 'cone' is not one of"):
        Traversal("cone")


def test_full_affiliate_fits_the_registry_limit() -> None:
    punches = tuple(PunchIntent(PEER, b"\x04" * 8, 1_800_000_000_000 + i) for i in range(MAX_PUNCH_INTENTS))
    pb = _local(Traversal("eim", True, punches)).to_pb()
    # AES-GCM adds a 12-byte nonce and a 16-byte tag; the registry's data limit is 2 KiB.
    assert len(pb.SerializeToString()) + 28 < 2048


def test_wire_classes_are_the_classifiers() -> None:
    from kubespan.nat.classify import NatClass

    assert set(NAT_CLASSES) == {c.value for c in NatClass}

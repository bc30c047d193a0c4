"""Identity: Talos' published ULA/EUI-64 vectors, key persistence, redaction."""

from __future__ import annotations

import os
import stat
from ipaddress import IPv6Address, IPv6Interface, IPv6Network, ip_address

import pytest

from kubespan import identity
from kubespan.constants import ULA_PURPOSE_KUBESPAN, ULA_PURPOSE_SIDEROLINK
from kubespan.identity import (
    IdentityError,
    LinkInfo,
    MeshIdentity,
    eui64_interface_id,
    generate_private_key,
    is_ula,
    load_identity,
    load_or_create_private_key,
    mesh_address,
    parse_mac,
    pick_mac,
    ula_prefix,
)
from kubespan.wireguard.types import PrivateKey

TALOS_CLUSTER_ID = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo="
TALOS_MAC = "2e:1a:b6:53:81:69"


def test_talos_ula_vector():
    assert ula_prefix(TALOS_CLUSTER_ID) == IPv6Network("fd7f:175a:b97c:5602::/64")


def test_talos_eui64_vector():
    addr = mesh_address(TALOS_CLUSTER_ID, TALOS_MAC)
    assert addr == IPv6Interface("fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169/64")
    assert addr.network == ula_prefix(TALOS_CLUSTER_ID)


def test_purpose_byte_and_other_purposes():
    side = ula_prefix(TALOS_CLUSTER_ID, ULA_PURPOSE_SIDEROLINK)
    assert side.network_address.packed[7] == 0x03
    assert side.network_address.packed[:7] == ula_prefix(TALOS_CLUSTER_ID).network_address.packed[:7]
    with pytest.raises(ValueError, match="purpose"):
        ula_prefix("x", 256)


def test_different_cluster_ids_give_different_prefixes():
    assert ula_prefix("a") != ula_prefix("b")
    for cid in ("a", "b", ""):
        p = ula_prefix(cid).network_address.packed
        assert p[0] == 0xFD and p[7] == 0x02


def test_is_ula():
    addr = mesh_address(TALOS_CLUSTER_ID, TALOS_MAC).ip
    assert is_ula(addr, ULA_PURPOSE_KUBESPAN)
    assert not is_ula(addr, ULA_PURPOSE_SIDEROLINK)
    assert not is_ula(ip_address("fc00::2"), ULA_PURPOSE_KUBESPAN)
    assert not is_ula(ip_address("10.0.0.1"), ULA_PURPOSE_KUBESPAN)


@pytest.mark.parametrize(
    ("mac", "expected"),
    [
        ("2e:1a:b6:53:81:69", "2c1ab6fffe538169"),
        ("00-11-22-33-44-55", "021122fffe334455"),
        (bytes.fromhex("021122334455"), "001122fffe334455"),
        ("00:11:22:33:44:55:66:77", "0211223344556677"),  # EUI-64 input: only the U/L flip
    ],
)
def test_eui64(mac, expected):
    assert eui64_interface_id(mac).hex() == expected


@pytest.mark.parametrize(
    "mac", ["", "00:00:00:00:00:00", "zz:11:22:33:44:55", "1:2:3:4:5:6", "00:11:22:33:44", b"\x01" * 20]
)
def test_bad_macs(mac):
    with pytest.raises(ValueError, match="mac"):
        parse_mac(mac)


def test_pick_mac_prefers_first_physical_by_name():
    links = [
        LinkInfo("lo", b"\x00" * 6, physical=False, loopback=True),
        LinkInfo("veth0", b"\x02" * 6, physical=False),
        LinkInfo("eth1", b"\x11" * 6, physical=True),
        LinkInfo("eth0", b"\x10" * 6, physical=True),
    ]
    assert pick_mac(links) == b"\x10" * 6


def test_pick_mac_falls_back_to_virtual_links():
    links = [
        LinkInfo("lo", b"\x01" * 6, physical=False, loopback=True),
        LinkInfo("vethb", b"\x0b" * 6, physical=False),
        LinkInfo("detha", b"\x00" * 6, physical=False),  # zero MAC: skipped
        LinkInfo("vetha", b"\x0a" * 6, physical=False),
    ]
    assert pick_mac(links) == b"\x0a" * 6
    assert pick_mac([LinkInfo("lo", b"\x01" * 6, False, True), LinkInfo("tun0", None, False)]) is None


def test_generated_key_is_clamped_and_random():
    a, b = generate_private_key(), generate_private_key()
    assert a != b
    for k in (a, b):
        assert k.raw[0] & 7 == 0
        assert k.raw[31] & 0x80 == 0
        assert k.raw[31] & 0x40


def test_key_created_once_0600_and_reused(tmp_path):
    state = tmp_path / "state" / "nested"
    key, created = load_or_create_private_key(state)
    assert created
    path = state / "kubespan-identity.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert path.read_text() == key.b64 + "\n"
    again, created2 = load_or_create_private_key(state)
    assert not created2
    assert again == key
    # no temporary files left behind
    assert sorted(p.name for p in state.iterdir()) == ["kubespan-identity.key"]


def test_loosened_permissions_are_tightened(tmp_path):
    key, _ = load_or_create_private_key(tmp_path)
    path = tmp_path / "kubespan-identity.key"
    path.chmod(0o644)
    assert load_or_create_private_key(tmp_path)[0] == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_corrupt_key_is_an_error_without_content(tmp_path):
    path = tmp_path / "kubespan-identity.key"
    secretish = "c2VjcmV0LWJ1dC10b28tc2hvcnQ="
    path.write_text(secretish)
    with pytest.raises(IdentityError) as info:
        load_or_create_private_key(tmp_path)
    assert secretish not in str(info.value)
    assert "corrupt" in str(info.value)
    assert path.read_text() == secretish  # never silently replaced


def test_symlinked_key_file_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text(generate_private_key().b64)
    (tmp_path / "kubespan-identity.key").symlink_to(target)
    with pytest.raises(IdentityError):
        load_or_create_private_key(tmp_path)


def test_directory_instead_of_key_file_refused(tmp_path):
    (tmp_path / "kubespan-identity.key").mkdir()
    with pytest.raises(IdentityError):
        load_or_create_private_key(tmp_path)


def test_exclusive_write_never_replaces_existing_key(tmp_path):
    path = tmp_path / "k"
    first = generate_private_key()
    assert identity._write_key_exclusive(path, first)
    second = generate_private_key()
    assert not identity._write_key_exclusive(path, second)
    assert PrivateKey.from_b64(path.read_text()) == first
    assert os.listdir(tmp_path) == ["k"]


def test_lost_race_uses_the_winner_key(tmp_path, monkeypatch):
    winner = generate_private_key()
    real = identity._write_key_exclusive

    def racing(path, key):
        real(path, winner)  # another process got there first
        return real(path, key)

    monkeypatch.setattr(identity, "_write_key_exclusive", racing)
    key, created = load_or_create_private_key(tmp_path)
    assert key == winner
    assert not created


def test_load_identity_recomputes_address_and_redacts(tmp_path):
    ident = load_identity(tmp_path, TALOS_CLUSTER_ID, TALOS_MAC)
    assert ident.address.ip == IPv6Address("fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169")
    assert ident.subnet == IPv6Network("fd7f:175a:b97c:5602::/64")
    assert ident.public_key == ident.private_key.public_key()
    text = repr(ident) + str(ident) + f"{ident}"
    assert ident.private_key.b64 not in text
    assert ident.public_key.b64 in text
    # same key, new cluster id: the address follows the cluster id
    other = load_identity(tmp_path, "another-cluster", TALOS_MAC)
    assert other.private_key == ident.private_key
    assert other.address != ident.address
    assert MeshIdentity.derive(ident.private_key, TALOS_CLUSTER_ID, TALOS_MAC) == ident

"""WireGuard value types: key codecs, redaction, endpoints, normalisation."""

from __future__ import annotations

import base64
from ipaddress import ip_address, ip_network

import pytest

from kubespan.wireguard.types import (
    AddrPort,
    DeviceConfig,
    InvalidKeyError,
    ObservedDevice,
    ObservedPeer,
    PeerConfig,
    PresharedKey,
    PrivateKey,
    PublicKey,
    sorted_networks,
)

# RFC 7748 section 6.1 test vector (Alice)
ALICE_PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def test_private_key_derives_rfc7748_public_key():
    assert PrivateKey(ALICE_PRIV).public_key() == PublicKey(ALICE_PUB)


def test_base64_and_hex_round_trip():
    k = PublicKey(ALICE_PUB)
    assert PublicKey.from_b64(k.b64) == k
    assert PublicKey.from_hex(k.hex) == k
    assert k.b64 == base64.b64encode(ALICE_PUB).decode()
    assert k.hex == ALICE_PUB.hex()
    assert type(PrivateKey.from_b64(base64.b64encode(ALICE_PRIV).decode())) is PrivateKey


@pytest.mark.parametrize(
    "text",
    ["", "not base64!", base64.b64encode(b"x" * 31).decode(), base64.b64encode(b"x" * 33).decode()],
)
def test_bad_base64_keys_rejected(text):
    with pytest.raises(InvalidKeyError):
        PublicKey.from_b64(text)


@pytest.mark.parametrize("text", ["00" * 31, "zz" * 32, "0" * 65])
def test_bad_hex_keys_rejected(text):
    with pytest.raises(InvalidKeyError):
        PublicKey.from_hex(text)


def test_wrong_length_raw_rejected():
    with pytest.raises(InvalidKeyError):
        PublicKey(b"\x00" * 16)


def test_secret_keys_never_print_their_bytes():
    priv = PrivateKey(ALICE_PRIV)
    psk = PresharedKey(b"\x07" * 32)
    for secret in (priv, psk):
        for text in (
            repr(secret),
            str(secret),
            f"{secret}",
            f"{secret!r}",
            repr([secret]),
            repr({"k": secret}),
        ):
            assert secret.b64 not in text
            assert secret.hex not in text
            assert "redacted" in text
    cfg = PeerConfig(PublicKey(ALICE_PUB), preshared_key=psk)
    assert psk.b64 not in repr(cfg)
    dev = DeviceConfig(priv, 51820)
    assert priv.b64 not in repr(dev)


def test_public_key_shows_base64_and_sorts_by_bytes():
    a, b = PublicKey(b"\x01" * 32), PublicKey(b"\x02" * 32)
    assert str(a) == a.b64 and a.b64 in repr(a)
    assert sorted([b, a]) == [a, b]


def test_key_types_do_not_compare_equal_across_kinds():
    assert PublicKey(ALICE_PUB) != PresharedKey(ALICE_PUB)
    assert hash(PublicKey(ALICE_PUB)) == hash(PublicKey(bytes(ALICE_PUB)))


@pytest.mark.parametrize(
    ("text", "ip", "port"),
    [
        ("1.2.3.4:51820", "1.2.3.4", 51820),
        ("[2001:db8::1]:1", "2001:db8::1", 1),
        ("[fe80::1%eth0]:51820", "fe80::1%eth0", 51820),
        (" 10.0.0.1:65535 ", "10.0.0.1", 65535),
    ],
)
def test_addrport_parse_and_format(text, ip, port):
    ap = AddrPort.parse(text)
    assert ap == AddrPort(ip_address(ip), port)
    assert AddrPort.parse(str(ap)) == ap


@pytest.mark.parametrize(
    "text",
    [
        "1.2.3.4",
        "1.2.3.4:0",
        "1.2.3.4:70000",
        "2001:db8::1:51820",
        "[2001:db8::1]51820",
        "host:1",
        "1.2.3.4:x",
    ],
)
def test_addrport_parse_rejects(text):
    with pytest.raises(ValueError):
        AddrPort.parse(text)


def test_addrport_str_brackets_v6_and_accepts_strings():
    assert str(AddrPort("2001:db8::1", 5)) == "[2001:db8::1]:5"
    assert str(AddrPort("192.0.2.1", 5)) == "192.0.2.1:5"


def test_peer_config_normalises():
    p = PeerConfig(PublicKey(ALICE_PUB), ["10.0.0.7/24", "fd00::1"], preshared_key=PresharedKey(bytes(32)))
    assert p.allowed_ips == frozenset({ip_network("10.0.0.0/24"), ip_network("fd00::1/128")})
    assert p.preshared_key is None  # zero PSK == no PSK
    with pytest.raises(ValueError, match="persistent_keepalive"):
        PeerConfig(PublicKey(ALICE_PUB), persistent_keepalive=70000)


def test_device_config_checks_keys_and_is_read_only():
    priv = PrivateKey(ALICE_PRIV)
    a = PeerConfig(PublicKey(b"\x01" * 32))
    with pytest.raises(ValueError, match="does not match"):
        DeviceConfig(priv, 1, peers={PublicKey(b"\x02" * 32): a})
    dev = DeviceConfig.of(priv, 51820, 0x20, [a])
    assert dict(dev.peers) == {a.public_key: a}
    with pytest.raises(TypeError):
        dev.peers[a.public_key] = a  # type: ignore[index]


def test_observed_peer_config_projection():
    o = ObservedPeer(PublicKey(ALICE_PUB), ["10.0.0.1/32"], AddrPort("1.1.1.1", 5), 25, None, 10, 20, 1.5)
    assert o.config() == PeerConfig(PublicKey(ALICE_PUB), ["10.0.0.1/32"], AddrPort("1.1.1.1", 5), 25)


def test_observed_device_public_key():
    assert ObservedDevice(PrivateKey(ALICE_PRIV)).public_key == PublicKey(ALICE_PUB)
    assert ObservedDevice().public_key is None


def test_sorted_networks_v4_first():
    nets = [
        ip_network("fd00::/64"),
        ip_network("10.0.0.0/8"),
        ip_network("10.0.0.0/16"),
        ip_network("1.0.0.0/8"),
    ]
    assert sorted_networks(nets) == [nets[3], nets[1], nets[2], nets[0]]


def test_key_hash_is_the_bytes_hash_and_equal_keys_collide():
    raw = bytes(range(32))
    assert hash(PublicKey(raw)) == hash(PublicKey(bytes(raw))) == hash(raw)
    assert {PublicKey(raw): 1}[PublicKey(bytes(raw))] == 1
    assert PublicKey(raw) != PresharedKey(raw)  # same hash, still different kinds


def test_observed_peer_unchecked_equals_the_checked_constructor():
    from ipaddress import ip_network

    from kubespan.wireguard.types import observed_peer_unchecked

    args = (
        PublicKey(bytes(range(32))),
        frozenset({ip_network("10.0.0.0/24")}),
        AddrPort("192.0.2.1", 51820),
        25,
        PresharedKey(b"\x07" * 32),
        1,
        2,
        1700000000.5,
        1,
    )
    fast, checked = observed_peer_unchecked(*args), ObservedPeer(*args)
    assert fast == checked and hash(fast) == hash(checked) and repr(fast) == repr(checked)
    assert fast.config() == checked.config()
    with pytest.raises(AttributeError):
        fast.rx_bytes = 5  # still frozen

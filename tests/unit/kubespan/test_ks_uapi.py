"""UAPI codec: exact request text, response parsing, errno, and encode/parse round trips."""

from __future__ import annotations

from ipaddress import IPv4Network, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubespan.uapi import (
    GET_REQUEST,
    UapiError,
    UapiProtocolError,
    check_set_response,
    decode_set,
    encode_get_response,
    encode_set,
    parse_errno,
    parse_get,
)
from kubespan.wgdiff import AddPeer, RemovePeer, SetDevice, UpdatePeer, diff_device
from kubespan.wgtypes import (
    AddrPort,
    DeviceConfig,
    ObservedDevice,
    ObservedPeer,
    PeerConfig,
    PresharedKey,
    PrivateKey,
    PublicKey,
)

PRIV = PrivateKey(bytes(range(32)))
PSK = PresharedKey(b"\x05" * 32)
K1 = PublicKey(b"\x01" * 32)
K2 = PublicKey(b"\x02" * 32)


def test_get_request():
    assert GET_REQUEST == b"get=1\n\n"


def test_encode_full_request_exact_text():
    ops = [
        SetDevice(PRIV, 51820, 0x20),
        RemovePeer(K2),
        UpdatePeer(
            K1,
            endpoint=AddrPort("2001:db8::1", 51820),
            allowed_ips=frozenset({ip_network("fd00::1/128"), ip_network("10.0.0.0/24")}),
        ),
        AddPeer(PeerConfig(K2, frozenset({ip_network("10.1.0.1/32")}), AddrPort("192.0.2.1", 1), 25, PSK)),
    ]
    text = encode_set(ops).decode()
    assert text == (
        "set=1\n"
        f"private_key={PRIV.hex}\n"
        "listen_port=51820\n"
        "fwmark=32\n"
        f"public_key={K2.hex}\n"
        "remove=true\n"
        f"public_key={K1.hex}\n"
        "update_only=true\n"
        "endpoint=[2001:db8::1]:51820\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.0.0.0/24\n"
        "allowed_ip=fd00::1/128\n"
        f"public_key={K2.hex}\n"
        f"preshared_key={PSK.hex}\n"
        "endpoint=192.0.2.1:1\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.1.0.1/32\n"
        "\n"
    )
    assert "replace_peers" not in text


def test_device_keys_come_first_even_if_set_device_is_last():
    text = encode_set([RemovePeer(K1), SetDevice(listen_port=1)]).decode()
    assert text.index("listen_port=1") < text.index("public_key=")


def test_update_with_only_keepalive_does_not_touch_allowed_ips():
    text = encode_set([UpdatePeer(K1, persistent_keepalive=0)]).decode()
    assert "persistent_keepalive_interval=0" in text
    assert "allowed_ip" not in text and "replace_allowed_ips" not in text


def test_update_to_empty_allowed_ips_still_replaces():
    text = encode_set([UpdatePeer(K1, allowed_ips=frozenset())]).decode()
    assert "replace_allowed_ips=true\n" in text and "allowed_ip=" not in text


def test_nothing_to_send():
    assert encode_set([]) is None
    assert encode_set([SetDevice()]) is None


def test_keys_are_hex_never_base64():
    text = encode_set([AddPeer(PeerConfig(K1, preshared_key=PSK))]).decode()
    assert K1.b64 not in text and PSK.b64 not in text
    assert f"public_key={K1.hex}" in text


WG_GO_SAMPLE = f"""private_key={PRIV.hex}
listen_port=51999
fwmark=32
public_key={K1.hex}
preshared_key={"0" * 64}
protocol_version=1
endpoint=192.0.2.99:1
last_handshake_time_sec=1700000000
last_handshake_time_nsec=500000000
tx_bytes=1184
rx_bytes=920
persistent_keepalive_interval=25
allowed_ip=10.9.0.0/16
public_key={K2.hex}
preshared_key={PSK.hex}
protocol_version=1
endpoint=[2001:db8::3]:5
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=0
allowed_ip=10.0.3.0/24
allowed_ip=fd00::3/128
errno=0

"""


def test_parse_wireguard_go_get_response():
    dev = parse_get(WG_GO_SAMPLE)
    assert dev.private_key == PRIV and dev.listen_port == 51999 and dev.fwmark == 32
    p1, p2 = dev.peers[K1], dev.peers[K2]
    assert p1.preshared_key is None
    assert p1.endpoint == AddrPort("192.0.2.99", 1)
    assert p1.last_handshake == pytest.approx(1700000000.5)
    assert (p1.tx_bytes, p1.rx_bytes, p1.persistent_keepalive) == (1184, 920, 25)
    assert p1.allowed_ips == frozenset({ip_network("10.9.0.0/16")})
    assert p2.preshared_key == PSK
    assert p2.last_handshake is None
    assert p2.endpoint == AddrPort("2001:db8::3", 5)
    assert p2.allowed_ips == frozenset({ip_network("10.0.3.0/24"), ip_network("fd00::3/128")})
    assert parse_get(WG_GO_SAMPLE.encode()) == dev


def test_parse_fresh_device_and_unknown_keys():
    dev = parse_get("listen_port=46748\nsome_future_key=1\nerrno=0\n\n")
    assert dev == ObservedDevice(None, 46748, 0, {})
    dev = parse_get(f"public_key={K1.hex}\nfuture_peer_key=x\nerrno=0\n")
    assert set(dev.peers) == {K1}


def test_parse_get_errno_raises():
    with pytest.raises(UapiError) as info:
        parse_get("errno=-22\n\n")
    assert info.value.code == -22
    assert info.value.errno == 22
    assert "Invalid argument" in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("listen_port=x\nerrno=0\n", "listen_port must be a non-negative integer"),
        ("listen_port=70000\nerrno=0\n", "listen_port is above 65535"),
        (f"public_key={K1.hex}\nendpoint=nope\nerrno=0\n", "endpoint is not ip:port"),
        (f"public_key={K1.hex}\nallowed_ip=10.0.0.0/99\nerrno=0\n", "allowed_ip is not a prefix"),
        (f"public_key={K1.hex}\nlast_handshake_time_nsec=1000000000\nerrno=0\n", "above 999999999"),
        ("public_key=abc\nerrno=0\n", "public_key is not a 64-character hex key"),
        ("garbage\n", "expected key=value"),
        ("listen_port=1\n\n", "no errno"),
        ("errno=x\n", "errno must be an integer"),
    ],
)
def test_parse_get_protocol_errors(text, fragment):
    with pytest.raises(UapiProtocolError, match=fragment):
        parse_get(text)


def test_private_key_value_never_in_errors():
    bad = "zz" + PRIV.hex[2:]
    with pytest.raises(UapiProtocolError) as info:
        parse_get(f"private_key={bad}\nerrno=0\n")
    assert bad not in str(info.value) and PRIV.hex[2:] not in str(info.value)


def test_set_response():
    check_set_response(b"errno=0\n\n")
    with pytest.raises(UapiError):
        check_set_response(b"errno=-98\n\n")
    with pytest.raises(UapiProtocolError):
        check_set_response(b"\n")
    assert parse_errno("errno=5\n\n") == 5
    with pytest.raises(UapiProtocolError, match="ASCII"):
        parse_errno("errno=0\u00e9\n".encode())


def test_decode_set_rejects_replace_peers_and_junk():
    with pytest.raises(UapiProtocolError, match="replace_peers"):
        decode_set("set=1\nreplace_peers=true\n\n")
    with pytest.raises(UapiProtocolError, match="expected set=1"):
        decode_set("get=1\n\n")
    with pytest.raises(UapiProtocolError, match="empty request"):
        decode_set("\n")
    with pytest.raises(UapiProtocolError, match="without replace_allowed_ips"):
        decode_set(f"set=1\npublic_key={K1.hex}\nallowed_ip=10.0.0.0/8\n\n")
    with pytest.raises(UapiProtocolError, match="bad value for endpoint"):
        decode_set(f"set=1\npublic_key={K1.hex}\nendpoint=x\n\n")


# --- round trips ---------------------------------------------------------------------------------

KEYS = [PublicKey(bytes([i]) * 32) for i in range(1, 6)]
prefixes = st.sampled_from(
    [IPv4Network((0x0A000000 + (i << 8), 24)) for i in range(6)]
    + [ip_network("fd00::/64"), ip_network("::/0")]
)
endpoints = st.none() | st.builds(
    AddrPort, st.sampled_from(["192.0.2.1", "2001:db8::1", "fe80::1%eth0"]), st.integers(1, 65535)
)
psks = st.sampled_from([None, PSK])


@st.composite
def device_configs(draw):
    peers = [
        PeerConfig(
            k,
            draw(st.frozensets(prefixes, max_size=3)),
            draw(endpoints),
            draw(st.integers(0, 65535)),
            draw(psks),
        )
        for k in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=4))
    ]
    return DeviceConfig.of(PRIV, draw(st.integers(1, 65535)), draw(st.integers(0, 2**32 - 1)), peers)


@st.composite
def observed_devices(draw):
    peers = {}
    for k in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=4)):
        hs = draw(st.none() | st.tuples(st.integers(1, 2**34), st.integers(0, 999_999_999)))
        peers[k] = ObservedPeer(
            k,
            draw(st.frozensets(prefixes, max_size=3)),
            draw(endpoints),
            draw(st.integers(0, 65535)),
            draw(psks),
            draw(st.integers(0, 2**64 - 1)),
            draw(st.integers(0, 2**64 - 1)),
            None if hs is None else hs[0] + hs[1] / 1e9,
        )
    return ObservedDevice(
        draw(st.none() | st.just(PRIV)), draw(st.integers(0, 65535)), draw(st.integers(0, 2**32 - 1)), peers
    )


@settings(max_examples=80)
@given(device_configs(), observed_devices())
def test_encode_decode_round_trip_of_diff(desired, observed):
    ops = diff_device(desired, observed)
    wire = encode_set(ops)
    if not ops:
        assert wire is None
        return
    assert wire is not None and wire.endswith(b"\n\n") and wire.startswith(b"set=1\n")
    assert decode_set(wire) == ops


@settings(max_examples=80)
@given(observed_devices())
def test_get_response_round_trip(dev):
    back = parse_get(encode_get_response(dev))
    assert back.private_key == dev.private_key
    assert back.listen_port == dev.listen_port and back.fwmark == dev.fwmark
    assert set(back.peers) == set(dev.peers)
    for k, p in dev.peers.items():
        q = back.peers[k]
        assert q.config() == p.config()
        assert (q.rx_bytes, q.tx_bytes) == (p.rx_bytes, p.tx_bytes)
        if p.last_handshake is None:
            assert q.last_handshake is None
        else:
            assert q.last_handshake == pytest.approx(p.last_handshake, abs=1e-3)

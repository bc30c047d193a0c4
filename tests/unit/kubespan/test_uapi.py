"""UAPI codec: exact request text, response parsing, errno, and encode/parse round trips."""

from __future__ import annotations

import re
from ipaddress import IPv4Network, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubespan.wireguard import uapi
from kubespan.wireguard.diff import AddPeer, RemovePeer, SetDevice, UpdatePeer, diff_device
from kubespan.wireguard.types import (
    AddrPort,
    DeviceConfig,
    ObservedDevice,
    ObservedPeer,
    PeerConfig,
    PresharedKey,
    PrivateKey,
    PublicKey,
)
from kubespan.wireguard.uapi import (
    GET_REQUEST,
    PeerCache,
    UapiError,
    UapiProtocolError,
    check_set_response,
    decode_set,
    encode_get_response,
    encode_set,
    encode_set_chunks,
    parse_errno,
    parse_get,
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


# --- fast path, caches and chunked sets (performance work must not change results) --------------


@settings(max_examples=80)
@given(observed_devices())
def test_fast_path_agrees_with_general_parser(dev):
    text = encode_get_response(dev).decode()
    fast_before = uapi.parse_stats["fast"]
    got = parse_get(text)
    assert uapi.parse_stats["fast"] == fast_before + 1, "wireguard-go's layout must take the fast path"
    assert got == uapi._parse_get_general(text)
    cache = PeerCache()
    assert parse_get(text, cache) == got
    assert parse_get(text, cache) == got  # now from the cache
    assert cache.hits == len(dev.peers)


def test_wireguard_go_sample_takes_fast_path_and_matches_general():
    before = uapi.parse_stats["fast"]
    dev = parse_get(WG_GO_SAMPLE)
    assert uapi.parse_stats["fast"] == before + 1
    assert dev == uapi._parse_get_general(WG_GO_SAMPLE)
    assert dev.peers[K1].allowed_ips == frozenset({ip_network("10.9.0.0/16")})


@pytest.mark.parametrize(
    "variant",
    [
        # other key orders, unknown keys, uppercase hex, blank lines, CRs: the general parser decides
        WG_GO_SAMPLE.replace(
            "protocol_version=1\nendpoint=192.0.2.99:1\n", "endpoint=192.0.2.99:1\nprotocol_version=1\n"
        ),
        WG_GO_SAMPLE.replace("tx_bytes=1184\n", "tx_bytes=1184\nfuture_key=7\n"),
        WG_GO_SAMPLE.replace(K1.hex, K1.hex.upper()),
        WG_GO_SAMPLE.replace("listen_port=51999\n", "listen_port=51999\n\n"),
        WG_GO_SAMPLE.replace("fwmark=32\n", "fwmark=32\nfuture_device_key=1\n"),
        WG_GO_SAMPLE.replace("allowed_ip=10.9.0.0/16\n", "allowed_ip=10.9.0.0/16\r\n"),
        WG_GO_SAMPLE.replace("errno=0\n\n", "errno=0\n"),
        WG_GO_SAMPLE.replace("errno=0\n\n", "errno=0\n\n\n"),
        "listen_port=1\nerrno=0\n\n",
        "errno=0\n\n",
        f"public_key={K1.hex}\nerrno=0\n\n",
    ],
)
def test_fast_path_and_general_parser_agree_on_variants(variant):
    try:
        want = uapi._parse_get_general(variant)
    except UapiProtocolError as e:
        with pytest.raises(UapiProtocolError, match=re.escape(str(e))):
            parse_get(variant)
        return
    assert parse_get(variant) == want
    assert parse_get(variant, PeerCache()) == want


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("tx_bytes=1184", f"tx_bytes={2**64}", "tx_bytes is above"),
        ("persistent_keepalive_interval=25", "persistent_keepalive_interval=65536", "above 65535"),
        ("protocol_version=1", f"protocol_version={2**32}", "protocol_version is above"),
        ("endpoint=192.0.2.99:1", "endpoint=192.0.2.99:0", "endpoint is not ip:port"),
        ("allowed_ip=10.9.0.0/16", "allowed_ip=10.9.0.0/33", "allowed_ip is not a prefix"),
        ("listen_port=51999", "listen_port=65536", "listen_port is above"),
        (f"private_key={PRIV.hex}", f"private_key={'0' * 63}x", "private_key is not a 64-character hex key"),
    ],
)
def test_fast_path_leaves_errors_to_the_general_parser(old, new, fragment):
    text = WG_GO_SAMPLE.replace(old, new, 1)
    assert text != WG_GO_SAMPLE
    with pytest.raises(UapiProtocolError, match=fragment):
        parse_get(text)
    with pytest.raises(UapiProtocolError, match=fragment):
        parse_get(text, PeerCache())


def test_errno_still_raises_with_cache():
    with pytest.raises(UapiError):
        parse_get("errno=-19\n\n", PeerCache())
    with pytest.raises(UapiError):
        parse_get(WG_GO_SAMPLE.replace("errno=0", "errno=-5"), PeerCache())


def test_peer_cache_reuses_only_unchanged_peers():
    cache = PeerCache()
    first = parse_get(WG_GO_SAMPLE, cache)
    assert (cache.hits, cache.misses) == (0, 2)
    changed = WG_GO_SAMPLE.replace("rx_bytes=920", "rx_bytes=1000")
    second = parse_get(changed, cache)
    assert (cache.hits, cache.misses) == (1, 3)
    assert second.peers[K2] is first.peers[K2]  # unchanged text: the same (immutable) object
    assert second.peers[K1].rx_bytes == 1000 and first.peers[K1].rx_bytes == 920
    # only the last answer is kept: a removed peer leaves the cache
    only_k2 = (
        WG_GO_SAMPLE[: WG_GO_SAMPLE.index(f"public_key={K1.hex}")]
        + WG_GO_SAMPLE[WG_GO_SAMPLE.index(f"public_key={K2.hex}") :]
    )
    third = parse_get(only_k2, cache)
    assert set(third.peers) == {K2} and len(cache.peers) == 1
    # a malformed answer leaves the cache as it was
    with pytest.raises(UapiProtocolError):
        parse_get(only_k2.replace("tx_bytes=0", "tx_bytes=x"), cache)
    assert len(cache.peers) == 1


def test_value_caches_are_bounded(monkeypatch):
    monkeypatch.setattr(uapi, "_CACHE_MAX", 2)
    uapi.clear_caches()
    for n in range(5):
        parse_get(f"public_key={bytes([n + 1]).hex() * 32}\nallowed_ip=10.0.0.{n}/32\nerrno=0\n\n")
        assert len(uapi._key_cache) <= 2 and len(uapi._network_cache) <= 2
        assert len(uapi._allowed_cache) <= 2
    uapi.clear_caches()
    assert not uapi._key_cache and not uapi._network_cache and not uapi._allowed_cache


def test_secrets_are_not_cached_across_parses():
    uapi.clear_caches()
    parse_get(WG_GO_SAMPLE)
    cached = [*uapi._key_cache.values(), *uapi._endpoint_cache.values(), *uapi._network_cache.values()]
    assert PSK not in cached and PRIV not in cached
    assert PSK.hex not in uapi._key_cache and PRIV.hex not in uapi._key_cache


@settings(max_examples=60)
@given(device_configs(), observed_devices())
def test_chunks_join_to_the_single_request(desired, observed):
    ops = diff_device(desired, observed)
    whole = encode_set(ops)
    chunks = encode_set_chunks(ops)
    if whole is None:
        assert chunks is None
        return
    assert b"".join(chunks) == whole


def test_large_set_is_chunked_with_a_small_first_piece():
    peers = [
        PeerConfig(PublicKey(n.to_bytes(32, "big")), frozenset({ip_network(f"fd00::{n:x}/128")}))
        for n in range(1, 1001)
    ]
    ops = diff_device(DeviceConfig.of(PRIV, 1, 0, peers), None)
    chunks = list(encode_set_chunks(ops))
    assert b"".join(chunks) == encode_set(ops)
    assert len(chunks) > 4 and chunks[0].count(b"public_key=") == 8
    assert max(c.count(b"public_key=") for c in chunks) == 256
    assert chunks[-1].endswith(b"\n\n") and not any(c.endswith(b"\n\n") for c in chunks[:-1])
    assert encode_set_chunks([]) is None and encode_set_chunks([SetDevice()]) is None
    with pytest.raises(TypeError):
        encode_set_chunks([RemovePeer(K1), object()])  # checked before the first piece


_hextet = st.sampled_from([0, 0, 0, 1, 0xFFFF, 0x64, 0xFF9B]) | st.integers(0, 0xFFFF)


@settings(max_examples=400)
@given(st.lists(_hextet, min_size=8, max_size=8), st.integers(0, 128), st.integers(0, 2**32 - 1))
def test_fast_address_formatting_is_str(hextets, plen, v4):
    from ipaddress import IPv4Address, IPv6Address, IPv6Network

    v6 = IPv6Address(int.from_bytes(b"".join(h.to_bytes(2, "big") for h in hextets), "big"))
    net6 = IPv6Network((v6, plen), strict=False)
    assert uapi._v6_text(v6) == str(v6)
    assert uapi._net_text(net6) == str(net6)
    net4 = IPv4Network((v4, plen % 33), strict=False)
    assert uapi._net_text(net4) == str(net4)
    for ep in (AddrPort(v6, 51820), AddrPort(IPv4Address(v4), 1)):
        assert uapi._endpoint_text(ep) == str(ep)


@pytest.mark.parametrize(
    "ip", ["::ffff:192.0.2.1", "::192.0.2.1", "::", "::1", "fe80::1%eth0", "64:ff9b::c000:201", "1:0:0:1::"]
)
def test_fast_address_formatting_special_cases(ip):
    ep = AddrPort(ip, 7)
    assert uapi._endpoint_text(ep) == str(ep)
    assert uapi._v6_text(ep.ip) == str(ep.ip)


@pytest.mark.parametrize("bad", ["g" * 64, "0" * 62 + " 1", "=" * 64])
def test_fast_path_keys_are_checked_like_the_general_parser(bad):
    for old in (K1.hex, PSK.hex):
        text = WG_GO_SAMPLE.replace(old, bad, 1)
        with pytest.raises(UapiProtocolError, match="is not a 64-character hex key"):
            parse_get(text)
        with pytest.raises(UapiProtocolError, match="is not a 64-character hex key"):
            parse_get(text, PeerCache())

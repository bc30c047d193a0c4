"""Affiliate encryption: wire format, round trips and robustness against hostile input."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf import message as pb_message
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery import crypto
from discovery.limits import AFFILIATE_DATA_MAX, AFFILIATE_PLAINTEXT_MAX
from spanapi.discovery.client import affiliate_pb2
from spanutil.ipcodec import ip_to_bytes

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def sample_affiliate() -> affiliate_pb2.Affiliate:
    return affiliate_pb2.Affiliate(
        node_id="7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC",
        addresses=[ip_to_bytes("10.0.0.1"), ip_to_bytes("fd00::1")],
        hostname="node-1.example",
        nodename="node-1",
        machine_type="worker",
        operating_system="Talos (v1.14.0)",
        kubespan=affiliate_pb2.KubeSpan(
            public_key="mVRj3mTdTfaWnhJe8rqL3M7s4w0hP7ZqmJ6PQ2qQ0m0=",
            address=ip_to_bytes("fd7a:115c:a1e0::1"),
            additional_addresses=[crypto.prefix_to_pb("10.244.1.0/24")],
            exclude_advertised_addresses=[crypto.prefix_to_pb("192.168.0.0/16")],
        ),
        control_plane=affiliate_pb2.ControlPlane(api_server_port=6443),
    )


# --- secret ------------------------------------------------------------------------------------------------


def test_parse_secret_round_trip_and_whitespace() -> None:
    b64 = base64.b64encode(KEY).decode()
    assert crypto.parse_secret(b64) == KEY
    assert crypto.parse_secret(f"  {b64}\n") == KEY
    assert crypto.parse_secret(b64.encode()) == KEY


@pytest.mark.parametrize(
    "secret",
    [
        base64.b64encode(b"S3cr3tS3cr3tS3cr3tS3cr3t").decode(),  # 24 bytes
        base64.b64encode(b"S3cr3t" * 6).decode(),  # 36 bytes
        "S3cr3t!notbase64@@@@S3cr3t",
        base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),  # URL-safe alphabet is not StdEncoding
        base64.b64encode(b"S3cr3tS3cr3tS3cr3tS3cr3tS3cr3tAB").decode().rstrip("="),  # missing padding
        "",
    ],
)
def test_bad_secret_rejected_without_echo(secret: str) -> None:
    with pytest.raises(crypto.SecretError) as info:
        crypto.parse_secret(secret)
    text = str(info.value)
    assert "32 bytes" in text
    if secret:
        assert secret not in text
        assert "S3cr3t" not in text
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__  # nothing chained to print


def test_wrong_key_size_rejected() -> None:
    with pytest.raises(crypto.SecretError):
        crypto.encrypt_affiliate(b"short", sample_affiliate())
    with pytest.raises(crypto.SecretError):
        crypto.decrypt_endpoint(b"\x00" * 16, b"\x00" * 16)


# --- affiliate data ----------------------------------------------------------------------------------------


def test_affiliate_round_trip() -> None:
    aff = sample_affiliate()
    blob = crypto.encrypt_affiliate(KEY, aff)
    assert crypto.decrypt_affiliate(KEY, blob) == aff


def test_affiliate_wire_format_is_nonce_ciphertext_tag() -> None:
    aff = sample_affiliate()
    plain = aff.SerializeToString(deterministic=True)
    blob = crypto.encrypt_affiliate(KEY, aff)
    assert len(blob) == 12 + len(plain) + 16
    # Independent decryption with the raw primitive: no associated data.
    assert AESGCM(KEY).decrypt(blob[:12], blob[12:], None) == plain
    # And a blob produced independently decrypts with ours (what a Go client would send).
    nonce = bytes(12)
    foreign = nonce + AESGCM(KEY).encrypt(nonce, plain, None)
    assert crypto.decrypt_affiliate(KEY, foreign) == aff


def test_affiliate_known_answer() -> None:
    # AES-256-GCM, key 00..1f, all-zero nonce, plaintext Affiliate{node_id: "a"} = 0a 01 61, no AAD.
    blob = bytes(12) + bytes.fromhex("04bdd4" + "6875a93b33573efa381021a611c460cb")
    assert crypto.decrypt_affiliate(KEY, blob) == affiliate_pb2.Affiliate(node_id="a")


def test_affiliate_nonce_is_random() -> None:
    aff = sample_affiliate()
    blobs = {crypto.encrypt_affiliate(KEY, aff) for _ in range(16)}
    assert len(blobs) == 16
    assert len({b[:12] for b in blobs}) == 16


def test_affiliate_tampering_and_wrong_key_rejected() -> None:
    blob = crypto.encrypt_affiliate(KEY, sample_affiliate())
    for i in (0, 11, 12, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(crypto.DecryptError):
            crypto.decrypt_affiliate(KEY, bytes(bad))
    with pytest.raises(crypto.DecryptError):
        crypto.decrypt_affiliate(OTHER_KEY, blob)
    with pytest.raises(crypto.DecryptError):
        crypto.decrypt_affiliate(KEY, blob[:-1])


@pytest.mark.parametrize("size", [0, 1, 27])
def test_affiliate_too_short(size: int) -> None:
    with pytest.raises(crypto.MalformedBlobError, match="at least 28"):
        crypto.decrypt_affiliate(KEY, b"\x00" * size)


def test_affiliate_authentic_but_not_protobuf() -> None:
    nonce = bytes(12)
    blob = nonce + AESGCM(KEY).encrypt(nonce, b"\xff\xff\xff\xff", None)
    with pytest.raises(crypto.MalformedBlobError):
        crypto.decrypt_affiliate(KEY, blob)


def test_empty_affiliate_is_28_bytes() -> None:
    blob = crypto.encrypt_affiliate(KEY, affiliate_pb2.Affiliate())
    assert len(blob) == 28
    assert crypto.decrypt_affiliate(KEY, blob) == affiliate_pb2.Affiliate()


def test_affiliate_size_limit() -> None:
    # Affiliate{hostname: "x" * n}: tag(1) + varint length(2) + n bytes.
    at_limit = affiliate_pb2.Affiliate(hostname="x" * (AFFILIATE_PLAINTEXT_MAX - 3))
    assert at_limit.ByteSize() == AFFILIATE_PLAINTEXT_MAX
    assert len(crypto.encrypt_affiliate(KEY, at_limit)) == AFFILIATE_DATA_MAX
    over = affiliate_pb2.Affiliate(hostname="x" * (AFFILIATE_PLAINTEXT_MAX - 2))
    with pytest.raises(crypto.AffiliateTooLargeError, match="2020"):
        crypto.encrypt_affiliate(KEY, over)


# --- endpoints ---------------------------------------------------------------------------------------------


def _ecb_decrypt(key: bytes, blob: bytes) -> bytes:
    d = Cipher(algorithms.AES(key), modes.ECB()).decryptor()
    return d.update(blob) + d.finalize()


def _ecb_encrypt(key: bytes, plain: bytes) -> bytes:
    e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return e.update(plain) + e.finalize()


def test_ipv4_endpoint_known_answer() -> None:
    ep = crypto.endpoint_from_addr("192.168.1.1", 51820)
    blob = crypto.encrypt_endpoint(KEY, ep)
    assert len(blob) == 16
    # length byte 10, then Endpoint{ip: c0a80101, port: 51820}, zero padded.
    expected_plain = bytes.fromhex("0a" + "0a04c0a80101" + "10ec9403") + bytes(5)
    assert _ecb_decrypt(KEY, blob) == expected_plain
    assert blob == _ecb_encrypt(KEY, expected_plain)
    assert blob.hex() == "ce4731c5f611cdbc59714a7acccefd74"  # AES-256-ECB, key 00..1f
    assert crypto.decrypt_endpoint(KEY, blob) == ep


def test_ipv6_endpoint_is_32_bytes() -> None:
    ep = crypto.endpoint_from_addr("2001:db8::1", 65535)
    blob = crypto.encrypt_endpoint(KEY, ep)
    assert len(blob) == 32
    plain = _ecb_decrypt(KEY, blob)
    body = ep.SerializeToString()
    assert plain == bytes([len(body)]) + body + bytes(32 - 1 - len(body))
    assert crypto.decrypt_endpoint(KEY, blob) == ep


def test_endpoint_is_deterministic_and_key_dependent() -> None:
    ep = crypto.endpoint_from_addr("203.0.113.7", 51820)
    assert crypto.encrypt_endpoint(KEY, ep) == crypto.encrypt_endpoint(KEY, ep)
    assert crypto.encrypt_endpoint(KEY, ep) != crypto.encrypt_endpoint(OTHER_KEY, ep)
    other = crypto.endpoint_from_addr("203.0.113.7", 51821)
    assert crypto.encrypt_endpoint(KEY, ep) != crypto.encrypt_endpoint(KEY, other)


@pytest.mark.parametrize("size", [0, 1, 15, 17, 31, 33])
def test_endpoint_bad_length_rejected(size: int) -> None:
    with pytest.raises(crypto.MalformedBlobError, match="multiple of 16"):
        crypto.decrypt_endpoint(KEY, b"\x01" * size)


def test_endpoint_size_byte_too_large_rejected() -> None:
    # The Go client would slice out of range and panic here.
    blob = _ecb_encrypt(KEY, bytes([200]) + bytes(15))
    with pytest.raises(crypto.MalformedBlobError, match="size byte"):
        crypto.decrypt_endpoint(KEY, blob)
    blob = _ecb_encrypt(KEY, bytes([16]) + bytes(15))
    with pytest.raises(crypto.MalformedBlobError, match="size byte"):
        crypto.decrypt_endpoint(KEY, blob)


def test_endpoint_bad_ip_length_rejected() -> None:
    body = affiliate_pb2.Endpoint(ip=b"\x01\x02\x03", port=1).SerializeToString()
    blob = _ecb_encrypt(KEY, bytes([len(body)]) + body + bytes(15 - len(body)))
    with pytest.raises(crypto.MalformedBlobError, match="4 or 16"):
        crypto.decrypt_endpoint(KEY, blob)


def test_endpoint_bad_port_rejected() -> None:
    body = affiliate_pb2.Endpoint(ip=bytes(4), port=70000).SerializeToString()
    blob = _ecb_encrypt(KEY, bytes([len(body)]) + body + bytes(15 - len(body)))
    with pytest.raises(crypto.MalformedBlobError, match="port"):
        crypto.decrypt_endpoint(KEY, blob)


def test_endpoint_with_unencodable_ip_refused_on_encrypt() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.encrypt_endpoint(KEY, affiliate_pb2.Endpoint(ip=bytes(40), port=1))


# --- conversions -------------------------------------------------------------------------------------------


def test_addresses_to_pb() -> None:
    assert crypto.addresses_to_pb(["10.0.0.1", "::1"]) == [bytes([10, 0, 0, 1]), bytes(15) + b"\x01"]


def test_endpoint_conversions() -> None:
    ep = crypto.endpoint_from_addr(ipaddress.IPv6Address("2001:db8::5"), 51820)
    assert crypto.endpoint_to_addr(ep) == (ipaddress.IPv6Address("2001:db8::5"), 51820)
    with pytest.raises(ValueError, match="65535"):
        crypto.endpoint_from_addr("10.0.0.1", 65536)


def test_prefix_conversions() -> None:
    p = crypto.prefix_to_pb(ipaddress.ip_network("10.244.0.0/16"))
    assert (p.ip, p.bits) == (bytes([10, 244, 0, 0]), 16)
    assert crypto.prefix_from_pb(p) == ipaddress.ip_network("10.244.0.0/16")
    host = crypto.prefix_to_pb("fd7a:115c:a1e0::5/128")
    assert crypto.prefix_from_pb(host) == ipaddress.ip_network("fd7a:115c:a1e0::5/128")
    iface = crypto.prefix_to_pb(ipaddress.ip_interface("10.0.0.5/24"))
    assert iface.ip == bytes([10, 0, 0, 5])  # host bits kept on the wire, like netip.Prefix
    assert crypto.prefix_from_pb(iface) == ipaddress.ip_network("10.0.0.0/24")
    with pytest.raises(ValueError, match="exceeds 32"):
        crypto.prefix_from_pb(affiliate_pb2.IPPrefix(ip=bytes(4), bits=33))


# --- hostile input -----------------------------------------------------------------------------------------


def test_decode_error_is_a_protobuf_decode_error() -> None:
    assert issubclass(crypto.MalformedBlobError, pb_message.DecodeError)
    assert issubclass(crypto.DecryptError, crypto.DecodeError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=96))
def test_decrypt_endpoint_arbitrary_bytes_only_decode_error(blob: bytes) -> None:
    try:
        ep = crypto.decrypt_endpoint(KEY, blob)
    except crypto.DecodeError:
        return
    assert len(ep.ip) in (4, 16) and ep.port <= 0xFFFF


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2100))
def test_decrypt_affiliate_arbitrary_bytes_only_decode_error(blob: bytes) -> None:
    with pytest.raises(crypto.DecodeError):
        crypto.decrypt_affiliate(KEY, blob)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_decrypt_affiliate_authentic_garbage_only_decode_error(plain: bytes) -> None:
    nonce = bytes(12)
    blob = nonce + AESGCM(KEY).encrypt(nonce, plain, None)
    try:
        crypto.decrypt_affiliate(KEY, blob)
    except crypto.DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 30), st.binary(max_size=31))
def test_decrypt_endpoint_structured_garbage_only_decode_error(size: int, body: bytes) -> None:
    plain = bytes([size]) + body
    plain += bytes(-len(plain) % 16)
    try:
        crypto.decrypt_endpoint(KEY, _ecb_encrypt(KEY, plain))
    except crypto.DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
        st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)),
    ),
    st.integers(0, 65535),
)
def test_endpoint_round_trip_property(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    blob = crypto.encrypt_endpoint(KEY, crypto.endpoint_from_addr(ip, port))
    assert len(blob) == (16 if ip.version == 4 else 32)
    assert crypto.endpoint_to_addr(crypto.decrypt_endpoint(KEY, blob)) == (ip, port)

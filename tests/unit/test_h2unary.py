"""spanutil.h2unary's encoding and HPACK decoding, against RFC 7541's examples (no network)."""

from __future__ import annotations

import pytest

from spanutil.h2unary import CountingBody, H2Error, HpackDecoder, grpc_message, hpack_int, request_headers


def test_hpack_int_rfc7541_examples() -> None:
    assert hpack_int(10, 5) == bytes([0b01010])  # C.1.1
    assert hpack_int(1337, 5) == bytes([0x1F, 0x9A, 0x0A])  # C.1.2
    assert hpack_int(42, 8) == bytes([42])  # C.1.3


def test_decoder_rfc7541_c3_requests_share_the_dynamic_table() -> None:
    d = HpackDecoder()
    first = d.decode(bytes.fromhex("828684410f7777772e6578616d706c652e636f6d"))
    assert first == [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", b"www.example.com"),
    ]
    assert d.size == 57
    second = d.decode(bytes.fromhex("828684be58086e6f2d6361636865"))
    assert second[3] == (b":authority", b"www.example.com")  # index 62: the dynamic entry
    assert second[4] == (b"cache-control", b"no-cache")
    assert d.size == 110
    third = d.decode(bytes.fromhex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"))
    assert third[2:] == [
        (b":path", b"/index.html"),
        (b":authority", b"www.example.com"),
        (b"custom-key", b"custom-value"),
    ]
    assert d.size == 164


def test_decoder_memo_is_dropped_when_the_table_changes() -> None:
    d = HpackDecoder()
    d.decode(bytes.fromhex("400b677270632d7374617475730130"))  # grpc-status: 0, incremental indexing
    assert d.decode(b"\xbe") == [(b"grpc-status", b"0")]
    d.decode(bytes.fromhex("400b677270632d7374617475730133"))  # grpc-status: 3 now at 62
    assert d.decode(b"\xbe") == [(b"grpc-status", b"3")]
    assert d.decode(b"\xbf") == [(b"grpc-status", b"0")]


def test_decoder_eviction_and_size_update() -> None:
    d = HpackDecoder(max_size=64)
    d.decode(bytes.fromhex("400b677270632d7374617475730130"))  # 11 + 1 + 32 = 44 bytes
    d.decode(bytes.fromhex("400b677270632d7374617475730133"))  # the first is evicted
    assert list(d.table) == [(b"grpc-status", b"3")]
    d.decode(b"\x20")  # size update to 0 empties it
    assert not d.table
    with pytest.raises(H2Error, match="not in the table"):
        d.decode(b"\xbe")
    with pytest.raises(H2Error, match="above our 64"):
        d.decode(b"\x3f\x22")  # size update to 31 + 34 = 65


def test_decoder_refuses_huffman_status_but_skips_other_huffman_values() -> None:
    d = HpackDecoder()
    # grpc-message (literal name, not indexed) with a Huffman-coded value: skipped unread
    assert d.decode(b"\x00\x0cgrpc-message\x82\xab\xcd") == [(b"grpc-message", b"?")]
    with pytest.raises(H2Error, match="Huffman"):
        d.decode(b"\x00\x0bgrpc-status\x81\x07")


def test_request_headers_decode_to_a_grpc_post() -> None:
    block = request_headers("127.0.0.1:5000", "/sidero.discovery.server.Cluster/AffiliateUpdate")
    d = HpackDecoder()
    assert d.decode(block) == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/sidero.discovery.server.Cluster/AffiliateUpdate"),
        (b":authority", b"127.0.0.1:5000"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    assert not d.table  # nothing indexed: the block is valid on any stream of any connection


def test_counting_body_changes_eight_bytes_per_call() -> None:
    msg = bytes(range(40))
    body = CountingBody(msg, 10)
    first = bytes(body())
    second = bytes(body())
    assert first[:5] == grpc_message(msg)[:5]
    assert first != second
    assert second[15:23] == (2).to_bytes(8, "big")
    assert second[5:15] == msg[:10] and second[23:] == msg[18:]
    assert body.message == second[5:]
    with pytest.raises(ValueError, match="offset 35"):
        CountingBody(msg, 35)

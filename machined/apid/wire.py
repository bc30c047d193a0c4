"""Raw protobuf surgery for merging replies from several nodes (machined.md §3, "Merging").

apid never decodes replies. Envelope convention: a unary reply is ``XResponse{repeated X messages = 1}``
and every ``X`` (and every stream message) starts with ``common.Metadata metadata = 1``.

* :func:`splice_reply` sets ``metadata.hostname = <node>`` in each item of a unary reply and
  :func:`splice_item` in one stream message, ``<node>`` being the target as the caller typed it (as
  upstream Talos does: the NODE column then shows what the operator asked for, the same string as a
  failed node's error entry). The splice appends an encoded ``Metadata{hostname}`` as another field
  1 inside the item: protobuf merges repeated occurrences of an embedded message, the last scalar
  wins, and the backend's ``error``/``status`` are kept.
* Unary replies from several nodes are merged by **concatenation**: repeated fields append.
* :func:`error_reply` / :func:`error_item` encode a failed node as
  ``EmptyResponse{[Empty{metadata{hostname, error, status}}]}`` (or one ``Empty`` stream message),
  which every ``XResponse`` decodes as one item with only metadata.
"""

from __future__ import annotations

import grpc
from google.rpc import status_pb2

from spanapi.talos.common import common_pb2

WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32 = 0, 1, 2, 5


class WireError(ValueError):
    pass


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise WireError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fields(buf: bytes) -> list[tuple[int, int, int, int, int]]:
    """``(field, wire_type, start, value_start, end)`` of each top-level field (``start`` = tag offset)."""
    out = []
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise WireError("field number 0")
        if wt == WIRE_VARINT:
            _, j = _varint(buf, i)
            vs = i
        elif wt == WIRE_I64:
            vs, j = i, i + 8
        elif wt == WIRE_I32:
            vs, j = i, i + 4
        elif wt == WIRE_LEN:
            n, vs = _varint(buf, i)
            j = vs + n
        else:
            raise WireError(f"unsupported wire type {wt}")
        if j > len(buf):
            raise WireError("truncated field")
        out.append((num, wt, start, vs, j))
        i = j
    return out


def _len_field(num: int, payload: bytes) -> bytes:
    return _enc_varint(num << 3 | WIRE_LEN) + _enc_varint(len(payload)) + payload


def hostname_metadata(hostname: str) -> bytes:
    """``field 1 = Metadata{hostname}`` as bytes to append to an item."""
    return _len_field(1, common_pb2.Metadata(hostname=hostname).SerializeToString())


def splice_item(item: bytes, hostname: str) -> bytes:
    """One stream message (or reply item) with ``metadata.hostname`` set to ``hostname``."""
    fields(item)  # refuse malformed bytes rather than append to them
    return item + hostname_metadata(hostname)


def splice_reply(reply: bytes, hostname: str) -> bytes:
    """A unary ``XResponse`` with each ``messages`` item spliced; other top-level fields kept."""
    out = bytearray()
    for num, wt, start, vs, end in fields(reply):
        if num == 1 and wt == WIRE_LEN:
            out += _len_field(1, splice_item(reply[vs:end], hostname))
        else:
            out += reply[start:end]
    return bytes(out)


def merge(replies: list[bytes]) -> bytes:
    return b"".join(replies)


def error_metadata(hostname: str, code: grpc.StatusCode, message: str) -> common_pb2.Metadata:
    return common_pb2.Metadata(
        hostname=hostname, error=message, status=status_pb2.Status(code=code.value[0], message=message)
    )


def error_item(hostname: str, code: grpc.StatusCode, message: str) -> bytes:
    """``common.Empty{metadata{hostname, error, status}}``: a failed node in a stream."""
    return common_pb2.Empty(metadata=error_metadata(hostname, code, message)).SerializeToString()


def error_reply(hostname: str, code: grpc.StatusCode, message: str) -> bytes:
    """``common.EmptyResponse{[Empty{...}]}``: a failed node in a merged unary reply."""
    return _len_field(1, error_item(hostname, code, message))

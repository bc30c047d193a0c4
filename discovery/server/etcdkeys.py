"""The etcd store's key layout, under the client's namespace (``--etcd-prefix``).

- ``c/<cluster>/a/<affiliate>``: the affiliate's encrypted data blob (empty for a data-less one);
- ``c/<cluster>/e/<affiliate>/<hex endpoint>``: one key per encrypted endpoint (empty value);
- ``l/<bucket>``: the ID of the shared lease of one time bucket;
- ``s/<replica>``: a replica's barrier key.

IDs are %-escaped so that they hold no ``/``.
"""

from __future__ import annotations

import functools
from urllib.parse import quote, unquote

__all__ = [
    "affiliate_key",
    "affiliate_prefix",
    "barrier_key",
    "cluster_prefix",
    "endpoint_prefix",
    "escape_id",
    "lease_key",
    "parse_key",
]

# Characters kept as they are in an ID; "/" and "%" (and everything else) are %-escaped.
_SAFE = "-_.~+=:@!$&'()*,;"


@functools.lru_cache(maxsize=1 << 14)
def escape_id(value: str) -> str:
    """An ID as it appears in a key: UTF-8, %-escaped, without ``/`` (memoized: every update and
    watch event of an affiliate builds or parses its keys)."""
    return quote(value, safe=_SAFE)


@functools.lru_cache(maxsize=1 << 14)
def _unescape(part: bytes) -> str:
    return unquote(part.decode(), errors="strict")


def cluster_prefix(cid: str) -> str:
    return f"c/{escape_id(cid)}/"


def affiliate_key(cid: str, aid: str) -> str:
    return f"c/{escape_id(cid)}/a/{escape_id(aid)}"


def affiliate_prefix(cid: str) -> str:
    return f"c/{escape_id(cid)}/a/"


def endpoint_prefix(cid: str, aid: str) -> str:
    return f"c/{escape_id(cid)}/e/{escape_id(aid)}/"


def lease_key(bucket: int) -> str:
    return f"l/{bucket}"


def parse_key(key: bytes) -> tuple[str, str, bytes | None] | None:
    """``(cluster, affiliate, endpoint or None for the data key)`` of a ``c/`` key, else None."""
    parts = key.split(b"/")
    try:
        if parts[0] != b"c":
            return None
        cid, aid = _unescape(parts[1]), _unescape(parts[3])
        if len(parts) == 4 and parts[2] == b"a":
            return cid, aid, None
        if len(parts) == 5 and parts[2] == b"e":
            return cid, aid, bytes.fromhex(parts[4].decode())
    except (IndexError, ValueError):
        pass
    return None


def barrier_key(replica: str) -> str:
    return f"s/{replica}"

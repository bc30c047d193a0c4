"""discovery.etcd.client without etcd: endpoint URLs, prefix ends, the namespace on keys and ranges."""

from __future__ import annotations

import pytest

from discovery.etcd.client import Compare, Endpoint, EtcdClient, Op, prefix_end


@pytest.mark.parametrize(
    ("url", "target", "secure"),
    [
        ("http://10.0.0.1:2379", "10.0.0.1:2379", False),
        ("https://etcd.example:12379", "etcd.example:12379", True),
        ("127.0.0.1:2379", "127.0.0.1:2379", False),
        ("http://[fd00::1]:2379/", "[fd00::1]:2379", False),
        ("https://etcd", "etcd:2379", True),
    ],
)
def test_endpoint_parse(url: str, target: str, secure: bool) -> None:
    assert Endpoint.parse(url) == Endpoint(target, secure)


@pytest.mark.parametrize("url", ["unix:///run/etcd.sock", "http://host:2379/v3", "http://:2379"])
def test_endpoint_parse_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(url)


def test_prefix_end() -> None:
    assert prefix_end(b"/d/") == b"/d0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"
    assert prefix_end(b"") == b"\0"


def test_namespace_on_keys_ranges_and_txn_parts() -> None:
    c = EtcdClient(["127.0.0.1:1"], namespace="/r1/")
    req = c._range_request("c/", prefix=True)
    assert (req.key, req.range_end) == (b"/r1/c/", b"/r1/c0")
    req = c._range_request("c/x", range_end=b"\0")  # everything from c/x on, in the namespace only
    assert (req.key, req.range_end) == (b"/r1/c/x", b"/r10")
    cmp = c._compare(Compare.create("c/", "<", 7, prefix=True))
    assert (cmp.key, cmp.range_end, cmp.create_revision, cmp.WhichOneof("target_union")) == (
        b"/r1/c/",
        b"/r1/c0",
        7,
        "create_revision",
    )
    op = c._op(Op.put("k", b"v", lease=5, ignore_value=True))
    assert op.request_put.key == b"/r1/k" and op.request_put.lease == 5 and op.request_put.ignore_value
    bare = EtcdClient(["127.0.0.1:1"])
    assert bare._range_request("", range_end=b"\0").range_end == b"\0"


def test_needs_an_endpoint() -> None:
    with pytest.raises(ValueError):
        EtcdClient([])

"""The proxy's authorization, routing and merging with fake channels and a fake servicer context."""

import asyncio

import grpc
import pytest

from machined import pki
from machined.apid import proxy as proxy_mod
from machined.apid.proxy import Proxy
from machined.apid.tls import Identity
from spanapi.talos.common import common_pb2
from spanapi.talos.machine import machine_pb2

VERSION = "/machine.MachineService/Version"


class Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(details)
        self.code, self.details = code, details


class Ctx:
    def __init__(self, pem=None, md=()):
        self._pem, self._md = pem, tuple(md)

    def auth_context(self):
        return {"x509_pem_cert": [self._pem]} if self._pem else {}

    def invocation_metadata(self):
        return self._md

    def time_remaining(self):
        return None

    async def abort(self, code, details=""):
        raise Aborted(code, details)


class FakeChannel:
    """``unary_unary(method)(request, metadata=, timeout=)`` answers from ``reply`` (bytes or exception)."""

    def __init__(self, reply):
        self.reply, self.seen = reply, []

    def unary_unary(self, method):
        async def call(request, metadata=None, timeout=None):  # noqa: ASYNC109
            self.seen.append((method, request, list(metadata or ())))
            if isinstance(self.reply, Exception):
                raise self.reply
            return self.reply

        return call

    async def close(self, grace=None):
        pass


def rpc_error(code, details):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def version(host=""):
    return machine_pb2.VersionResponse(
        messages=[machine_pb2.Version(metadata=common_pb2.Metadata(hostname=host))]
    ).SerializeToString()


@pytest.fixture
async def setup():
    ca = pki.generate_ca()
    p = Proxy("/nonexistent.sock", Identity(ca, "front", ["127.0.0.1"]), name="front")
    yield ca, p
    await p.close()


def pem(kp):
    return kp.crt


async def test_authorization_refusals(setup):
    ca, p = setup
    with pytest.raises(Aborted) as e:
        await p._unary(VERSION, b"", Ctx())
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(Aborted) as e:
        await p._unary(VERSION, b"", Ctx(pem(pki.issue_server(ca, ["127.0.0.1"]))))
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "clientAuth" in e.value.details
    reader = pem(pki.issue_client(ca, ["os:reader"]))
    with pytest.raises(Aborted) as e:
        await p._unary("/machine.MachineService/ServiceRestart", b"", Ctx(reader))
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_local_call_gets_roles_and_no_routing_headers(setup):
    ca, p = setup
    p.local = FakeChannel(version("front"))
    md = [("talos-role", "os:admin"), ("x-trace", "1")]
    out = await p._unary(VERSION, b"req", Ctx(pem(pki.issue_client(ca, ["os:reader", "os:operator"])), md))
    assert out == version("front")
    _, req, sent = p.local.seen[0]
    assert req == b"req"
    assert sent == [("x-trace", "1"), ("talos-role", "os:operator"), ("talos-role", "os:reader")]


@pytest.mark.parametrize(
    "md, method, code",
    [
        ([("node", "a"), ("nodes", "b")], VERSION, grpc.StatusCode.INVALID_ARGUMENT),
        ([("node", "a"), ("node", "b")], VERSION, grpc.StatusCode.INVALID_ARGUMENT),
        ([("nodes", "a,b")], "/cosi.resource.State/Get", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_routing_errors(setup, md, method, code):
    ca, p = setup
    with pytest.raises(Aborted) as e:
        await p._unary(method, b"", Ctx(pem(pki.issue_client(ca, ["os:admin"])), md))
    assert e.value.code == code


async def test_no_forwarding_without_identity(setup):
    ca, _ = setup
    p = Proxy("/nonexistent.sock", None)
    try:
        with pytest.raises(Aborted) as e:
            await p._unary(VERSION, b"", Ctx(pem(pki.issue_client(ca, ["os:admin"])), [("node", "x")]))
        assert (
            e.value.code == grpc.StatusCode.PERMISSION_DENIED and "no request forwarding" in e.value.details
        )
    finally:
        await p.close()


async def test_fan_out_merges_good_failed_and_malformed(setup, monkeypatch):
    ca, p = setup
    chans = {
        "a": FakeChannel(version("")),
        "b": FakeChannel(rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")),
        "c": FakeChannel(b"\x0a\x09garbage"),
        "d": FakeChannel(version("named")),
    }
    monkeypatch.setattr(p, "_channel", lambda node: chans[node])
    ctx = Ctx(pem(pki.issue_client(ca, ["os:reader"])), [("nodes", "a, b"), ("nodes", "c,d")])
    out = machine_pb2.VersionResponse.FromString(await p._unary(VERSION, b"", ctx))
    got = [(m.metadata.hostname, m.metadata.error) for m in out.messages]
    assert got[0] == ("a", "") and got[3] == ("d", "")  # the target as given, not the node's own name
    assert got[1][0] == "b" and "unreachable" in got[1][1]
    assert got[2][0] == "c" and "malformed" in got[2][1]
    # forwarded with proxyfrom and the caller's roles, routing headers stripped
    sent = chans["a"].seen[0][2]
    assert ("proxyfrom", "front") in sent and ("talos-role", "os:reader") in sent
    assert not any(k in ("node", "nodes") for k, _ in sent)


async def test_node_forward_errors_keep_status_and_malformed_is_internal(setup, monkeypatch):
    ca, p = setup
    chans = {"x": FakeChannel(rpc_error(grpc.StatusCode.NOT_FOUND, "nope")), "y": FakeChannel(b"\x80")}
    monkeypatch.setattr(p, "_channel", lambda node: chans[node])
    admin = pem(pki.issue_client(ca, ["os:admin"]))
    with pytest.raises(Aborted) as e:
        await p._unary(VERSION, b"", Ctx(admin, [("node", "x")]))
    assert (e.value.code, e.value.details) == (grpc.StatusCode.NOT_FOUND, "nope")
    with pytest.raises(Aborted) as e:
        await p._unary(VERSION, b"", Ctx(admin, [("node", "y")]))
    assert e.value.code == grpc.StatusCode.INTERNAL


async def test_channels_replaced_after_renewal_and_old_ones_closed(setup, monkeypatch):
    _ca, p = setup
    monkeypatch.setattr(proxy_mod, "RETIRE_GRACE", 0.0)
    c1 = p._channel("127.0.0.1:1")
    assert p._channel("127.0.0.1:1") is c1
    p.identity.renew()
    c2 = p._channel("127.0.0.1:1")
    assert c2 is not c1 and c1 in p._old
    for _ in range(50):
        if c1 not in p._old:
            break
        await asyncio.sleep(0.01)
    assert c1 not in p._old


def test_calls_to_other_nodes_end_before_the_callers_deadline():
    class Timed(Ctx):
        def __init__(self, left):
            super().__init__()
            self.left = left

        def time_remaining(self):
            return self.left

    # remote: 10 % earlier, at most 1 s earlier, never below 50 ms; local: the caller's own deadline
    assert Proxy._timeout(Timed(30.0), 5.0, remote=True) == pytest.approx(29.0)
    assert Proxy._timeout(Timed(2.0), 5.0, remote=True) == pytest.approx(1.8)
    assert Proxy._timeout(Timed(0.01), 5.0, remote=True) == pytest.approx(0.05)
    assert Proxy._timeout(Timed(30.0), 5.0) == pytest.approx(30.0)
    assert Proxy._timeout(Timed(None), 5.0, remote=True) == 5.0
    assert Proxy._timeout(Timed(1e10), None, remote=True) is None

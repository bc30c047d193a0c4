"""The proxy's authorization, routing and merging with fake channels and a fake servicer context."""

import asyncio
import itertools

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from machined import pki, tlsterm
from machined.api.roles import role_metadata
from machined.apid.proxy import Proxy
from machined.apid.tls import Identity
from spanapi.talos.common import common_pb2
from spanapi.talos.machine import machine_pb2

VERSION = "/machine.MachineService/Version"


class Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(details)
        self.code, self.details = code, details


PEERS = tlsterm.PeerRegistry()  # what the TLS terminator would have registered
_N = itertools.count()


class Ctx:
    """A call that arrived on a connection whose verified client certificate was ``pem`` (None: the
    connection did not come through the terminator)."""

    def __init__(self, pem=None, md=()):
        self._md = tuple(md)
        self._peer = f"unix:/fake/c-{next(_N)}"
        if pem:
            der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
            is_client, roles = tlsterm.cert_identity(der)
            PEERS.add(self._peer[5:], tlsterm.PeerInfo("ipv4:127.0.0.1:1", der, is_client, roles))

    def peer(self):
        return self._peer

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

    closed = False

    async def close(self, grace=None):
        self.closed = True


def use(p, chans):
    """Route ``node`` values to fake channels: the cache's factory gets ``backend_target(node)``."""
    p.channels.factory = lambda target: chans[target.removesuffix(":50000")]


def rpc_error(code, details):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def version(host=""):
    return machine_pb2.VersionResponse(
        messages=[machine_pb2.Version(metadata=common_pb2.Metadata(hostname=host))]
    ).SerializeToString()


@pytest.fixture
async def setup():
    ca = pki.generate_ca()
    p = Proxy("/nonexistent.sock", Identity(ca, "front", ["127.0.0.1"]), name="front", peers=PEERS)
    yield ca, p
    await p.close()


async def refusal(p: Proxy, method: str, ctx: Ctx) -> Aborted:
    """How ``p`` refused a unary call of ``method`` (it must abort)."""
    with pytest.raises(Aborted) as e:
        await p._unary(method, b"", ctx)
    return e.value


def pem(kp):
    return kp.crt


async def test_authorization_refusals(setup):
    ca, p = setup
    e = await refusal(p, VERSION, Ctx())
    assert e.code == grpc.StatusCode.UNAUTHENTICATED
    e = await refusal(p, VERSION, Ctx(pem(pki.issue_server(ca, ["127.0.0.1"]))))
    assert e.code == grpc.StatusCode.UNAUTHENTICATED and "clientAuth" in e.details
    reader = pem(pki.issue_client(ca, ["os:reader"]))
    e = await refusal(p, "/machine.MachineService/ServiceRestart", Ctx(reader))
    assert e.code == grpc.StatusCode.PERMISSION_DENIED


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
    e = await refusal(p, method, Ctx(pem(pki.issue_client(ca, ["os:admin"])), md))
    assert e.code == code


async def test_no_forwarding_without_identity(setup):
    ca, _ = setup
    p = Proxy("/nonexistent.sock", None, peers=PEERS)
    try:
        e = await refusal(p, VERSION, Ctx(pem(pki.issue_client(ca, ["os:admin"])), [("node", "x")]))
        assert e.code == grpc.StatusCode.PERMISSION_DENIED and "no request forwarding" in e.details
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
    use(p, chans)
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
    use(p, chans)
    admin = pem(pki.issue_client(ca, ["os:admin"]))
    e = await refusal(p, VERSION, Ctx(admin, [("node", "x")]))
    assert (e.code, e.details) == (grpc.StatusCode.NOT_FOUND, "nope")
    e = await refusal(p, VERSION, Ctx(admin, [("node", "y")]))
    assert e.code == grpc.StatusCode.INTERNAL


async def test_channels_replaced_after_renewal_and_old_ones_closed_after_their_calls(setup):
    _ca, p = setup
    made = []
    p.channels.factory = lambda target: made.append(FakeChannel(b"")) or made[-1]
    with p._lease("127.0.0.1:1") as c1:
        with p._lease("127.0.0.1:1") as again:
            assert again is c1  # one channel per target
        p.identity.renew()  # a new client certificate: new calls get a new channel ...
        with p._lease("127.0.0.1:1") as c2:
            assert c2 is not c1
        await asyncio.sleep(0)
        assert not c1.closed  # ... while the call still running on the old one finishes
    await asyncio.sleep(0)
    assert c1.closed and not c2.closed
    assert p.channels.stats()["replaced"] == 1


async def test_the_real_dial_is_a_dns_target(setup):
    """A host named like a grpc URI scheme (``unix:1234``) stays a host name: never a unix socket."""
    _ca, p = setup
    with p._lease("unix:1234") as ch:
        assert isinstance(ch, tlsterm.TlsChannel)
        assert (ch.dialer.host, ch.dialer.port) == ("unix", 1234)  # dialed over TCP + TLS
    assert "unix:1234" in p.channels


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


# -- bad targets, fan-out bound, the channel cache ----------------------------------------------------


@pytest.mark.parametrize(
    "md, needle",
    [
        ([("node", "h" * 256)], "the limit is 255"),
        ([("node", "unix:/run/machined/machined.sock")], "not a host"),
        ([("node", "a b")], "not a host"),
        ([("node", "user@h")], "not a host"),
        ([("node", "h:0")], "port must be a number from 1 to 65535"),
        ([("node", "h:65536")], "port must be a number from 1 to 65535"),
        ([("node", "h:http")], "port must be a number from 1 to 65535"),
        ([("node", "[fd00::1")], "not a host"),
        ([("node", "[h]:1")], "not a host"),
        ([("node", "fd00::zz")], "not a host"),
        ([("nodes", "ok1,ok2,bad/x")], "not a host"),
        (
            [("nodes", ",".join(f"10.0.{i // 250}.{i % 250}" for i in range(257)))],
            "the limit is 256 per call",
        ),
    ],
)
async def test_bad_targets_and_too_many_are_refused_before_dialing(setup, md, needle):
    ca, p = setup
    p.channels.factory = lambda target: pytest.fail(f"dialed {target}")
    e = await refusal(p, VERSION, Ctx(pem(pki.issue_client(ca, ["os:reader"])), md))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and needle in e.details, e.details
    assert len(p.channels) == 0


async def test_the_fan_out_bound_allows_256(setup):
    ca, p = setup
    p.channels.factory = lambda target: FakeChannel(version(""))
    nodes = [f"10.0.{i // 250}.{i % 250}" for i in range(256)]
    ctx = Ctx(pem(pki.issue_client(ca, ["os:reader"])), [("nodes", ",".join(nodes))])
    out = machine_pb2.VersionResponse.FromString(await p._unary(VERSION, b"", ctx))
    assert len(out.messages) == 256


async def test_3000_distinct_targets_keep_the_cache_bounded_and_close_what_leaves(tmp_path):
    """The issue: one reader naming 3,000 distinct node targets grew apid without bound."""
    ca = pki.generate_ca()
    made = []

    def factory(target):
        made.append(FakeChannel(rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")))
        return made[-1]

    p = Proxy(
        "/nonexistent.sock", Identity(ca, "front"), max_channels=32, channel_factory=factory, peers=PEERS
    )
    try:
        reader = pem(pki.issue_client(ca, ["os:reader"]))
        for i in range(3000):
            with pytest.raises(Aborted):
                await p._unary(VERSION, b"", Ctx(reader, [("node", f"10.{i // 250}.{i % 250}.1")]))
            assert len(p.channels) <= 32
        await asyncio.sleep(0)
        st = p.channels.stats()
        assert st["cached"] == 32 and st["draining"] == 0 and st["in_use"] == 0
        assert st["opened"] == 3000 and st["closed"] == 3000 - 32 and st["evicted"] == 3000 - 32
        assert sum(c.closed for c in made) == 3000 - 32
        assert not any(c.closed for c in made[-32:])  # the 32 most recent are the cached ones
    finally:
        await p.close()
    assert all(c.closed for c in made)


async def test_a_certificate_with_o_x_comma_admin_is_not_admin(setup):
    """One role per O= value: ``O=x,os:admin`` is one unknown role; it grants nothing and is never
    forwarded as (or split into) os:admin."""
    ca, p = setup
    p.local = FakeChannel(version("front"))
    odd = pem(pki.issue_client(ca, ["x,os:admin"]))
    for method in (VERSION, "/cosi.resource.State/Get", "/machine.MachineService/ApplyConfiguration"):
        e = await refusal(p, method, Ctx(odd, [("talos-role", "os:admin")]))
        assert e.code == grpc.StatusCode.PERMISSION_DENIED
    assert p.local.seen == []
    both = pem(pki.issue_client(ca, ["x,os:admin", "os:reader"]))
    await p._unary(VERSION, b"", Ctx(both))
    assert [v for k, v in p.local.seen[0][2] if k == "talos-role"] == ["os:reader"]
    e = await refusal(p, "/machine.MachineService/ApplyConfiguration", Ctx(both))
    assert e.code == grpc.StatusCode.PERMISSION_DENIED


async def test_an_impersonator_forwards_roles_one_value_each(setup):
    ca, p = setup
    p.local = FakeChannel(version("front"))
    imp = pem(pki.issue_client(ca, ["os:impersonator"]))
    await p._unary(VERSION, b"", Ctx(imp, role_metadata({"os:reader", "os:operator"})))
    assert [v for k, v in p.local.seen[0][2] if k == "talos-role"] == ["os:operator", "os:reader"]
    # a joined value from an impersonator is no role: nothing allowed (not its own certificate's roles)
    e = await refusal(p, VERSION, Ctx(imp, [("talos-role", "os:reader,os:admin")]))
    assert e.code == grpc.StatusCode.PERMISSION_DENIED


class StreamChannel:
    """``unary_stream(method)(...)`` yields ``n`` replies (forever when n is None)."""

    def __init__(self, n=None):
        self.n, self.closed, self.cancelled = n, False, 0

    def unary_stream(self, method):
        chan = self

        class Call:
            def __init__(self):
                self.i = 0

            def __aiter__(self):
                return self

            async def __anext__(self):
                if chan.n is not None and self.i >= chan.n:
                    raise StopAsyncIteration
                self.i += 1
                await asyncio.sleep(0)
                return version("")

            def cancel(self):
                chan.cancelled += 1

        return lambda request, metadata=None, timeout=None: Call()

    async def close(self, grace=None):
        self.closed = True


async def test_a_fan_out_stream_the_client_abandons_ends_and_returns_its_channels(setup):
    """The client reads one message and goes away while every node still has more to send (the
    merge queue full): the pumps end, and their channels are no longer in use."""
    ca, p = setup
    chans = {n: StreamChannel() for n in ("a", "b", "c")}
    use(p, chans)
    ctx = Ctx(pem(pki.issue_client(ca, ["os:reader"])), [("nodes", "a,b,c")])
    stream = p._stream("/machine.MachineService/Logs", b"", ctx)
    await stream.__anext__()
    await asyncio.sleep(0.05)  # the pumps fill the queue and block on it
    async with asyncio.timeout(5):
        await stream.aclose()
    assert p.channels.stats()["in_use"] == 0
    assert all(c.cancelled for c in chans.values())

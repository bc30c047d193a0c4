"""apid end to end on loopback: real TLS, the real machine API servicers behind it (in-process, on a
unix socket), an authorization matrix, refused certificates, node forwarding and fan-out."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import socket
import subprocess
import sys
import time

import grpc
import pytest
from google.protobuf import empty_pb2

from machined import pki
from machined.apid.testing import (
    Cluster,
    apid_command,
    apid_nodes,
    free_port,
    start_apid,
    start_machined,
    stop_processes,
)
from machined.state.catalog import KUBESPAN_IDENTITY, NS_KUBESPAN
from spanapi.talos.cosi import state_pb2, state_pb2_grpc
from spanapi.talos.machine import machine_pb2, machine_pb2_grpc

OK = "ok"
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
async def world(tmp_path):
    cluster = Cluster.create(tmp_path)
    srv, sock = await start_machined("node-a", tmp_path)
    apid = await start_apid(cluster, sock, "node-a")
    yield cluster, apid
    await apid.stop()
    await srv.stop()


CALLS = {
    "Version": lambda m, s: m.Version(empty_pb2.Empty(), timeout=5),
    "ServiceRestart": lambda m, s: m.ServiceRestart(machine_pb2.ServiceRestartRequest(id="nope"), timeout=5),
    "ApplyConfiguration": lambda m, s: m.ApplyConfiguration(
        machine_pb2.ApplyConfigurationRequest(data=b"not: [yaml", dry_run=True), timeout=5
    ),
    "GetSensitive": lambda m, s: s.Get(
        state_pb2.GetRequest(namespace=NS_KUBESPAN, type=KUBESPAN_IDENTITY, id="local"), timeout=5
    ),
}

# what each role gets; "past" = apid let it through and machined answered (any non-permission status)
MATRIX = {
    "os:admin": {"Version": OK, "ServiceRestart": "past", "ApplyConfiguration": "past", "GetSensitive": OK},
    "os:operator": {
        "Version": OK,
        "ServiceRestart": "past",
        "ApplyConfiguration": DENIED,
        "GetSensitive": DENIED,
    },
    "os:reader": {
        "Version": OK,
        "ServiceRestart": DENIED,
        "ApplyConfiguration": DENIED,
        "GetSensitive": DENIED,
    },
    "os:impersonator": {
        "Version": DENIED,
        "ServiceRestart": DENIED,
        "ApplyConfiguration": DENIED,
        "GetSensitive": DENIED,
    },
    "os:unknown": {
        "Version": DENIED,
        "ServiceRestart": DENIED,
        "ApplyConfiguration": DENIED,
        "GetSensitive": DENIED,
    },
    "os:etcd:backup": {  # EtcdSnapshot only
        "Version": DENIED,
        "ServiceRestart": DENIED,
        "ApplyConfiguration": DENIED,
        "GetSensitive": DENIED,
    },
    # one O= value is one role: "x,os:admin" is an unknown role, never os:admin (issue 11)
    "x,os:admin": {
        "Version": DENIED,
        "ServiceRestart": DENIED,
        "ApplyConfiguration": DENIED,
        "GetSensitive": DENIED,
    },
}


async def outcome(call):
    try:
        await call
        return OK
    except grpc.aio.AioRpcError as e:
        return e.code()


async def test_authorization_matrix(world):
    cluster, apid = world
    for role, expected in MATRIX.items():
        async with cluster.channel(apid.port, cluster.client(role)) as ch:
            m, s = machine_pb2_grpc.MachineServiceStub(ch), state_pb2_grpc.StateStub(ch)
            for name, make in CALLS.items():
                got = await outcome(make(m, s))
                want = expected[name]
                if want == "past":
                    assert got not in (
                        DENIED,
                        grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.UNAVAILABLE,
                    ), (role, name, got)
                else:
                    assert got == want, (role, name, got)


async def test_roles_reach_machined_and_replies_pass_through(world):
    cluster, apid = world
    async with cluster.channel(apid.port, cluster.client("os:reader")) as ch:
        m = machine_pb2_grpc.MachineServiceStub(ch)
        v = await m.Version(empty_pb2.Empty(), timeout=5)
        assert v.messages[0].metadata.hostname == "node-a"
        # a reader cannot smuggle admin through talos-role metadata
        s = state_pb2_grpc.StateStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.Get(
                state_pb2.GetRequest(namespace=NS_KUBESPAN, type=KUBESPAN_IDENTITY, id="local"),
                metadata=(("talos-role", "os:admin"),),
                timeout=5,
            )
        assert e.value.code() == DENIED
    async with cluster.channel(apid.port, cluster.client("os:admin", "os:reader")) as ch:
        s = state_pb2_grpc.StateStub(ch)
        r = await s.Get(
            state_pb2.GetRequest(namespace=NS_KUBESPAN, type=KUBESPAN_IDENTITY, id="local"), timeout=5
        )
        assert "PRIVATE" in r.resource.spec.yaml_spec
        # server streaming through the proxy
        got = [
            x
            async for x in s.List(
                state_pb2.ListRequest(namespace=NS_KUBESPAN, type=KUBESPAN_IDENTITY), timeout=5
            )
        ]
        assert [x.resource.metadata.id for x in got] == ["local"]


def other_ca_client():
    return pki.issue_client(pki.generate_ca(), ["os:admin"])


@pytest.mark.parametrize("which", ["none", "other-ca", "expired", "server-only"])
async def test_bad_client_certificates_refused(world, which):
    cluster, apid = world
    now = dt.datetime.now(dt.UTC)
    kp = {
        "none": None,
        "other-ca": other_ca_client(),
        "expired": cluster.client("os:admin", ttl=dt.timedelta(hours=1), now=now - dt.timedelta(hours=3)),
        "server-only": pki.issue_server(cluster.ca, ["127.0.0.1"], ["x"]),
    }[which]
    async with cluster.channel(apid.port, kp) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await machine_pb2_grpc.MachineServiceStub(ch).Version(empty_pb2.Empty(), timeout=5)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED), e.value


async def test_node_forwarding_and_fan_out_with_one_node_down(tmp_path):
    cluster = Cluster.create(tmp_path)
    async with apid_nodes(cluster, tmp_path, "front", "n1", "n2") as (front, n1, n2):
        dead = free_port()  # nothing listens there
        targets = [f"127.0.0.1:{n1.port}", f"127.0.0.1:{dead}", f"127.0.0.1:{n2.port}"]
        async with cluster.channel(front.port, cluster.client("os:reader")) as ch:
            m = machine_pb2_grpc.MachineServiceStub(ch)
            v = await m.Version(empty_pb2.Empty(), metadata=(("node", targets[0]),), timeout=10)
            assert [x.metadata.hostname for x in v.messages] == [targets[0]]  # the target as typed

            t0 = time.monotonic()
            v = await m.Version(empty_pb2.Empty(), metadata=[("nodes", t) for t in targets], timeout=15)
            assert time.monotonic() - t0 < 10
            ok = [x.metadata.hostname for x in v.messages if not x.metadata.error]
            bad = [x.metadata for x in v.messages if x.metadata.error]
            assert sorted(ok) == sorted([targets[0], targets[2]])
            assert len(bad) == 1 and bad[0].hostname == targets[1]
            assert (
                "unreachable" in bad[0].error and bad[0].status.code == grpc.StatusCode.UNAVAILABLE.value[0]
            )

            # server-streaming fan-out: every node's messages, one error message for the dead one
            logs = [
                x
                async for x in m.Logs(
                    machine_pb2.LogsRequest(id="machined", tail_lines=-1),
                    metadata=(("nodes", ",".join(targets)),),
                    timeout=15,
                )
            ]
            texts = sorted(x.bytes.decode().strip() for x in logs if not x.metadata.error)
            assert texts == ["hello from n1", "hello from n2"]
            assert [x.metadata.hostname for x in logs if x.metadata.error] == [targets[1]]

            # roles travel: the reader stays a reader on the other node
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await m.ServiceRestart(
                    machine_pb2.ServiceRestartRequest(id="x"), metadata=(("node", targets[0]),), timeout=10
                )
            assert e.value.code() == DENIED
            # COSI cannot fan out
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await state_pb2_grpc.StateStub(ch).Get(
                    state_pb2.GetRequest(namespace=NS_KUBESPAN, type=KUBESPAN_IDENTITY, id="local"),
                    metadata=(("nodes", ",".join(targets)),),
                    timeout=10,
                )
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # loop prevention: proxyfrom means local, whatever node says
            v = await m.Version(
                empty_pb2.Empty(), metadata=(("node", targets[0]), ("proxyfrom", "elsewhere")), timeout=10
            )
            assert [x.metadata.hostname for x in v.messages] == ["front"]

        # an admin's impersonated roles reach the remote machined
        async with cluster.channel(front.port, cluster.client("os:admin")) as ch:
            r = await state_pb2_grpc.StateStub(ch).Get(
                state_pb2.GetRequest(namespace=NS_KUBESPAN, type=KUBESPAN_IDENTITY, id="local"),
                metadata=(("node", targets[2]),),
                timeout=10,
            )
            assert "PRIVATE" in r.resource.spec.yaml_spec


async def test_server_certificate_renewed_and_hot_reloaded(tmp_path):
    cluster = Cluster.create(tmp_path)
    srv, sock = await start_machined("node-a", tmp_path)
    apid = await start_apid(cluster, sock, "node-a", cert_ttl=dt.timedelta(seconds=6))
    task = asyncio.create_task(apid.renew_loop())
    try:
        first = apid.identity.server.crt
        async with cluster.channel(apid.port, cluster.client("os:reader")) as ch:
            await machine_pb2_grpc.MachineServiceStub(ch).Version(empty_pb2.Empty(), timeout=5)
        async with asyncio.timeout(15):
            while apid.identity.server.crt == first:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        expiry = pki.load_certificate(first).not_valid_after_utc
        await asyncio.sleep(max(0.0, (expiry - dt.datetime.now(dt.UTC)).total_seconds()) + 0.5)
        # the first certificate has expired: a new handshake succeeds only with the renewed one
        async with cluster.channel(apid.port, cluster.client("os:reader")) as ch:  # new handshake
            await machine_pb2_grpc.MachineServiceStub(ch).Version(empty_pb2.Empty(), timeout=5)
    finally:
        task.cancel()
        await apid.stop()
        await srv.stop()


def test_real_machined_behind_apid_process(tmp_path):
    """The real ``machined`` (no root: the mesh is off) behind the real ``apid`` process."""
    machined = shutil.which("machined", path=os.path.dirname(sys.executable))
    if machined is None:
        pytest.skip("machined console script not installed")
    cluster = Cluster.create(tmp_path)
    from machined.config.testing import config_yaml

    mcfg = tmp_path / "machined.yaml"
    mcfg.write_text(config_yaml(kubespan=False, agent={"stateDir": str(tmp_path / "state")}))
    sock = tmp_path / "machined.sock"
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    machined,
                    "--config",
                    str(mcfg),
                    "--state-dir",
                    str(tmp_path / "state"),
                    "--socket",
                    str(sock),
                    "--hostname",
                    "real-node",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / "machined.log", "w"),
            )
        )
        deadline = time.monotonic() + 20
        while not sock.exists():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                pytest.skip(
                    f"machined did not start without root: {(tmp_path / 'machined.log').read_text()[-500:]}"
                )
            time.sleep(0.1)
        port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    *apid_command(),
                    "--config",
                    str(cluster.config),
                    "--machined-socket",
                    str(sock),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--hostname",
                    "real-node",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / "apid.log", "w"),
            )
        )

        async def call():
            async with cluster.channel(port, cluster.client("os:reader")) as ch:
                m = machine_pb2_grpc.MachineServiceStub(ch)
                for _ in range(100):
                    try:
                        return await m.Version(empty_pb2.Empty(), timeout=2)
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.2)
                raise AssertionError((tmp_path / "apid.log").read_text()[-2000:])

        v = asyncio.run(call())
        assert v.messages[0].metadata.hostname == "real-node"
        assert v.messages[0].version.tag
    finally:
        stop_processes(procs)


async def test_tls_1_2_minimum(world, tmp_path):
    import socket
    import ssl
    import warnings

    cluster, apid = world
    kp = cluster.client("os:admin")
    for name, data in (("c.pem", kp.crt), ("k.pem", kp.key), ("ca.pem", cluster.ca.crt)):
        (tmp_path / name).write_bytes(data)

    def probe(maxv):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(tmp_path / "ca.pem"))
        ctx.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
        ctx.set_alpn_protocols(["h2"])
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = maxv
        try:
            with (
                socket.create_connection(("127.0.0.1", apid.port), timeout=5) as s,
                ctx.wrap_socket(s, server_hostname="127.0.0.1") as t,
            ):
                return t.version()
        except (ssl.SSLError, OSError) as e:
            return e

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.TLSVersion.TLSv1_1
    assert isinstance(await asyncio.to_thread(probe, old), Exception)
    assert await asyncio.to_thread(probe, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert await asyncio.to_thread(probe, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


async def test_server_certificate_follows_node_addresses(tmp_path):
    """The mesh address appears after apid started: the certificate is re-issued with it at once
    (machined's NodeAddresses watch, not the 30 s poll); while machined is away (restarting) it keeps
    its addresses rather than being re-issued without them."""
    import ipaddress

    from cryptography import x509

    from machined.apid.testing import start_fake_machined
    from machined.state import Resource
    from machined.state.catalog import NODE_ADDRESS, NS_NETWORK

    cluster = Cluster.create(tmp_path)
    node, srv, sock = await start_fake_machined("node-a", tmp_path)
    apid = await start_apid(cluster, sock, "node-a")
    task = asyncio.create_task(apid.renew_loop())  # the default poll: 30 s
    try:
        first = apid.identity.server.crt
        await node.state.create(
            Resource.new(
                NS_NETWORK, NODE_ADDRESS, "current", {"addresses": ["192.0.2.7/24", "fd7a:115c::9/128"]}
            ),
            owner="test",
        )
        async with asyncio.timeout(10):
            while apid.identity.server.crt == first:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        san = apid.identity.server.certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        ips = set(san.get_values_for_type(x509.IPAddress))
        assert {ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("fd7a:115c::9")} <= ips
        gen = apid.identity.generation
        await asyncio.sleep(1)
        assert apid.identity.generation == gen  # no churn while nothing changes
        async with cluster.channel(apid.port, cluster.client("os:reader")) as ch:
            await machine_pb2_grpc.MachineServiceStub(ch).Version(empty_pb2.Empty(), timeout=5)
        await srv.stop()  # the watch breaks and is re-opened every second, finding no machined
        await asyncio.sleep(2.5)
        assert apid.identity.generation == gen
        assert "192.0.2.7" in apid.identity.addresses
        assert not task.done()
    finally:
        task.cancel()
        await apid.stop()
        await srv.stop()


async def test_fan_out_to_a_node_that_never_answers_still_returns_the_others(tmp_path):
    """A node that accepts TCP but never speaks (a hung host) must not cost the caller the other
    nodes' answers: apid's call to it ends before the caller's deadline and becomes an error entry."""
    cluster = Cluster.create(tmp_path)
    hung = socket.socket()  # accepts TCP (the kernel's listen backlog), never reads or answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    try:
        async with apid_nodes(cluster, tmp_path, "front", "n1") as (front, n1):
            targets = [f"127.0.0.1:{n1.port}", f"127.0.0.1:{hung.getsockname()[1]}"]
            async with cluster.channel(front.port, cluster.client("os:reader")) as ch:
                t0 = time.monotonic()
                v = await machine_pb2_grpc.MachineServiceStub(ch).Version(
                    empty_pb2.Empty(), metadata=(("nodes", ",".join(targets)),), timeout=4
                )
                took = time.monotonic() - t0
            assert took < 4, took
            assert [x.metadata.hostname for x in v.messages if not x.metadata.error] == [targets[0]]
            bad = [x.metadata for x in v.messages if x.metadata.error]
            assert [b.hostname for b in bad] == [targets[1]] and "unreachable" in bad[0].error
    finally:
        hung.close()


async def test_an_o_value_with_a_comma_is_one_role_end_to_end(tmp_path):
    """A CA-signed client certificate with ``O=x,os:admin`` (plus ``O=os:reader`` so apid lets reads
    through) must not read admin-only resources: not from the local machined, nor through another
    node's apid (the roles travel as one metadata value each)."""
    cluster = Cluster.create(tmp_path)
    async with apid_nodes(cluster, tmp_path, "front", "n1") as (front, n1):
        sensitive = state_pb2.GetRequest(namespace=NS_KUBESPAN, type=KUBESPAN_IDENTITY, id="local")
        kp = cluster.client("x,os:admin", "os:reader")
        assert pki.roles_of(pki.load_certificate(kp.crt)) == {"x,os:admin", "os:reader"}
        for md in ((), (("node", f"127.0.0.1:{n1.port}"),)):
            async with cluster.channel(front.port, kp) as ch:
                m, s = machine_pb2_grpc.MachineServiceStub(ch), state_pb2_grpc.StateStub(ch)
                v = await m.Version(empty_pb2.Empty(), metadata=md, timeout=10)  # a reader may
                assert v.messages[0].metadata.hostname in ("front", f"127.0.0.1:{n1.port}")
                # apid lets a reader's Get through; machined refuses the sensitive type (no os:admin)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await s.Get(sensitive, metadata=md, timeout=10)
                assert e.value.code() == DENIED and "os:admin role is required" in e.value.details(), md
                for name in ("ServiceRestart", "ApplyConfiguration"):
                    got = await outcome(_with(CALLS[name], m, s, md))
                    assert got == DENIED, (name, md)
        async with cluster.channel(front.port, cluster.client("os:admin")) as ch:
            r = await state_pb2_grpc.StateStub(ch).Get(sensitive, timeout=10)  # the control case
            assert "PRIVATE" in r.resource.spec.yaml_spec


def _with(make, m, s, md):
    """``make(m, s)`` with extra metadata: wrap the stubs' methods."""

    class Bound:
        def __init__(self, stub):
            self.stub = stub

        def __getattr__(self, name):
            fn = getattr(self.stub, name)
            return lambda req, **kw: fn(req, metadata=md, **kw)

    return make(Bound(m), Bound(s))


async def test_many_bogus_targets_do_not_grow_the_channel_cache(tmp_path):
    """A reader naming hundreds of distinct node targets: apid keeps at most --backend-channels
    channels, closes what it evicts, still forwards, keeps a channel that carries a stream (and lets
    the stream finish when the channel is replaced), and closes channels idle for --backend-idle."""
    from machined.apid.testing import start_fake_machined

    cluster = Cluster.create(tmp_path)
    bound = 8
    fsrv, fsock = await start_machined("front", tmp_path)
    n1node, n1srv, n1sock = await start_fake_machined("n1", tmp_path)
    front = await start_apid(cluster, fsock, "front", backend_channels=bound, backend_idle=2.0)
    n1 = await start_apid(cluster, n1sock, "n1")
    cache = front.proxy.channels
    dead = free_port()
    real = f"127.0.0.1:{n1.port}"
    try:
        async with cluster.channel(front.port, cluster.client("os:reader")) as ch:
            m = machine_pb2_grpc.MachineServiceStub(ch)
            # 300 distinct targets one by one (all refuse the connection), then fan-outs of 50
            for i in range(300):
                got = await outcome(
                    m.Version(
                        empty_pb2.Empty(),
                        metadata=(("node", f"127.0.{i // 250}.{i % 250 + 2}:{dead}"),),
                        timeout=10,
                    )
                )
                assert got == grpc.StatusCode.UNAVAILABLE
                assert len(cache) <= bound
            for j in range(4):
                targets = [f"127.1.{j}.{i + 2}:{dead}" for i in range(50)]
                v = await m.Version(empty_pb2.Empty(), metadata=(("nodes", ",".join(targets)),), timeout=15)
                assert len([x for x in v.messages if x.metadata.error]) == 50
                assert len(cache) <= bound
            await asyncio.sleep(0.2)
            st = cache.stats()
            assert st["cached"] <= bound and st["draining"] == 0 and st["in_use"] == 0, st
            assert st["opened"] == 500 and st["closed"] == st["opened"] - st["cached"], st

            # forwarding still works, and a stream on a channel that gets evicted runs to its end
            v = await m.Version(empty_pb2.Empty(), metadata=(("node", real),), timeout=10)
            assert [x.metadata.hostname for x in v.messages] == [real]
            logs = m.Logs(
                machine_pb2.LogsRequest(id="machined", tail_lines=1, follow=True),
                metadata=(("node", real),),
                timeout=30,
            )
            first = await logs.read()
            assert first.bytes.decode().strip() == "hello from n1"
            for i in range(2 * bound):  # the idle channels are evicted first: n1's carries a call
                await outcome(
                    m.Version(empty_pb2.Empty(), metadata=(("node", f"127.2.0.{i + 2}:{dead}"),), timeout=10)
                )
            assert len(cache) <= bound and real in cache
            # a renewed client certificate: n1's channel leaves the cache for new calls ...
            front.identity.renew()
            v = await m.Version(empty_pb2.Empty(), metadata=(("node", real),), timeout=10)
            assert [x.metadata.hostname for x in v.messages] == [real]
            assert cache.stats()["draining"] == 1 and cache.stats()["replaced"] == 1
            # ... and the stream still running on it goes on
            n1node.rings["machined"].append("after the eviction")
            nxt = await logs.read()
            assert nxt.bytes.decode().strip() == "after the eviction"
            logs.cancel()
            async with asyncio.timeout(10):
                while cache.stats()["draining"]:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            # idle expiry: nothing used for --backend-idle seconds → every channel closed
            async with asyncio.timeout(15):
                while len(cache):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            st = cache.stats()
            assert st["closed"] == st["opened"] and st["expired"] >= 1, st
            # and a new call simply opens a new channel
            v = await m.Version(empty_pb2.Empty(), metadata=(("node", real),), timeout=10)
            assert [x.metadata.hostname for x in v.messages] == [real]
    finally:
        await n1.stop()
        await front.stop()
        await n1srv.stop()
        await fsrv.stop()

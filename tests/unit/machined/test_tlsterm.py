"""The TLS terminator's pieces: role extraction from a verified leaf, the peer registry that hands the
identity to handlers, target parsing, and one terminator + dialer pair over real sockets (Ed25519)."""

from __future__ import annotations

import asyncio
import shutil

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from machined import pki, tlsterm
from machined.apid.testing import ed25519_ca


def der(kp: pki.KeyPair) -> bytes:
    return kp.certificate.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("make_ca", [ed25519_ca, pki.generate_ca], ids=["ed25519", "ecdsa"])
def test_roles_are_the_o_values_one_role_each(make_ca):
    ca = make_ca()
    is_client, roles = tlsterm.cert_identity(der(pki.issue_client(ca, ["os:admin", "os:reader"])))
    assert is_client and roles == {"os:admin", "os:reader"}
    # one O= value is one role, never split; a value that cannot be a role is dropped
    _, roles = tlsterm.cert_identity(der(pki.issue_client(ca, ["x,os:admin", " os:operator "])))
    assert roles == {"os:operator"}  # "x,os:admin" is no role name: never os:admin
    # a server certificate is no client certificate (EKU serverAuth only) and holds no role
    is_client, roles = tlsterm.cert_identity(der(pki.issue_server(ca, ["127.0.0.1"], ["n"])))
    assert not is_client and roles == frozenset()


def test_the_registry_knows_only_what_the_terminator_registered():
    reg = tlsterm.PeerRegistry()
    info = tlsterm.PeerInfo("ipv4:10.0.0.1:5", b"der", True, frozenset({"os:admin"}))
    reg.add("/run/apid-x/c-1", info)
    assert reg.lookup("unix:/run/apid-x/c-1") is info
    for peer in ("unix:", "unix:/run/apid-x/c-2", "ipv4:10.0.0.1:5", "", None, "/run/apid-x/c-1"):
        assert reg.lookup(peer) is None, peer
    reg.remove("/run/apid-x/c-1")
    assert reg.lookup("unix:/run/apid-x/c-1") is None and len(reg) == 0


def test_peer_strings_and_targets():
    assert tlsterm.tcp_peer_string(("10.0.0.1", 5)) == "ipv4:10.0.0.1:5"
    assert tlsterm.tcp_peer_string(("::1", 5, 0, 0)) == "ipv6:[::1]:5"
    assert tlsterm.split_target("[fd00::1]:50000") == ("fd00::1", 50000)
    assert tlsterm.split_target("node-1.example:50000") == ("node-1.example", 50000)


async def _echo_roles_server(sock: str) -> grpc.aio.Server:
    """A plaintext grpc server on a unix socket answering each call with the caller's roles."""
    srv = grpc.aio.server()
    reg = REG

    class H(grpc.GenericRpcHandler):
        def service(self, details):
            async def who(req, ctx):
                info = reg.lookup(ctx.peer())
                if info is None:
                    await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, "no identity")
                return ",".join(sorted(info.roles)).encode()

            return grpc.unary_unary_rpc_method_handler(who)

    srv.add_generic_rpc_handlers((H(),))
    srv.add_insecure_port(f"unix:{sock}")
    await srv.start()
    return srv


REG = tlsterm.PeerRegistry()


async def test_terminator_and_dialer_pass_the_verified_roles(tmp_path):
    ca = ed25519_ca()
    sockdir = tlsterm.private_dir("t-")
    backend = sockdir / "grpc.sock"
    srv = await _echo_roles_server(str(backend))
    server = pki.issue_server(ca, ["127.0.0.1"], ["n"])
    ctx = tlsterm.server_context(server.crt, server.key, sockdir, ca=ca.crt)
    term = tlsterm.TlsTerminator(lambda: ctx, backend, REG, sockdir)
    port = await term.start("127.0.0.1", 0)
    try:
        kp = pki.issue_client(ca, ["os:reader", "os:operator"])
        cctx = tlsterm.client_context(ca.crt, None, kp.crt, kp.key)
        async with tlsterm.TlsChannel.create(f"127.0.0.1:{port}", cctx, []) as ch:
            assert await ch.unary_unary("/x.Y/Who")(b"", timeout=5) == b"os:operator,os:reader"
            assert len(REG) == 1
        # a process reaching the private socket directly (unbound) has no identity
        async with grpc.aio.insecure_channel(f"unix:{backend}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ch.unary_unary("/x.Y/Who")(b"", timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # a name that does not match the server certificate is refused by the dialer
        async with tlsterm.TlsChannel.create(f"localhost:{port}", cctx, []) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ch.unary_unary("/x.Y/Who")(b"", timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        for _ in range(50):  # connections closed: their entries leave the registry
            if len(REG) == 0:
                break
            await asyncio.sleep(0.05)
        assert len(REG) == 0
    finally:
        await term.close()
        await srv.stop(0)
        shutil.rmtree(sockdir)


def test_private_dir_is_0700():
    d = tlsterm.private_dir("t-")
    assert d.stat().st_mode & 0o777 == 0o700
    d.rmdir()


def test_private_dir_goes_under_systemds_runtime_directory(monkeypatch):
    import tempfile
    from pathlib import Path

    run = Path(tempfile.mkdtemp(prefix="run-", dir="/tmp"))  # short, as /run/apid
    try:
        monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))
        d = tlsterm.private_dir("apid-")
        assert d.parent == run and d.stat().st_mode & 0o777 == 0o700
        monkeypatch.setenv("RUNTIME_DIRECTORY", str(run / "missing"))
        d = tlsterm.private_dir("apid-")
        assert d.parent != run / "missing"
        d.rmdir()
    finally:
        shutil.rmtree(run)


async def test_a_tls_channel_stands_for_a_grpc_aio_channel():
    ca = ed25519_ca()
    ch = tlsterm.TlsChannel.create("127.0.0.1:1", tlsterm.client_context(ca.crt), [])
    try:
        assert ch.get_state() == grpc.ChannelConnectivity.IDLE
        assert callable(ch.stream_unary) and callable(ch.unary_stream)
        assert ch.dialer.path.exists()
    finally:
        await ch.close()
    assert not ch.dialer.path.exists()


async def test_closing_a_dialer_ends_its_dials_in_flight(tmp_path):
    """A dial still in its TLS handshake (the server accepts TCP, never answers) ends with close():
    the grpc side's connection is closed, nothing is left pending (no "Task was destroyed" at loop end)."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    dialer = tlsterm.TlsDialer(f"127.0.0.1:{port}", tlsterm.client_context(pki.generate_ca().crt))
    await dialer.start()
    reader, writer = await asyncio.open_unix_connection(str(dialer.path))
    try:
        async with asyncio.timeout(5):
            while not dialer._dials:  # noqa: ASYNC110 (the dial starts on the next loop turns)
                await asyncio.sleep(0.01)
        dial = next(iter(dialer._dials))
        await dialer.close()
        assert dial.cancelled() and not dialer._dials
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # the grpc side sees its connection closed
    finally:
        writer.close()
        silent.close()
        await silent.wait_closed()

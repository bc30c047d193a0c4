"""WireGuard backends without root: the fake, sync(), the UAPI client, and wireguard-go supervision (with a stub)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
from ipaddress import ip_network
from pathlib import Path

import pytest

from kubespan.identity import generate_private_key
from kubespan.wireguard import UapiClient, UserspaceBackend, WireGuardBackend, WireGuardError, sync, uapi
from kubespan.wireguard.diff import AddPeer, RemovePeer, SetDevice, UpdatePeer, diff_device
from kubespan.wireguard.fake import FakeUapiServer, FakeWireGuard
from kubespan.wireguard.types import (
    AddrPort,
    DeviceConfig,
    ObservedDevice,
    PeerConfig,
    PresharedKey,
    PublicKey,
)

PRIV = generate_private_key()
PSK = PresharedKey(b"\x07" * 32)


def key(n: int) -> PublicKey:
    return PublicKey(n.to_bytes(2, "big") + bytes(30))


def peer(n: int, *nets: str, endpoint: str | None = None, keepalive: int = 0) -> PeerConfig:
    ep = AddrPort.parse(endpoint) if endpoint else None
    return PeerConfig(key(n), frozenset(ip_network(x) for x in nets), ep, keepalive, PSK)


def config(*peers: PeerConfig, port: int = 51820, fwmark: int = 0x20) -> DeviceConfig:
    return DeviceConfig.of(PRIV, port, fwmark, peers)


BASE = config(
    peer(1, "10.0.0.1/32", endpoint="192.0.2.1:51820"),
    peer(2, "10.0.0.2/32", "fd00::2/128", endpoint="[2001:db8::2]:51820", keepalive=25),
    peer(3, "10.0.0.3/32"),
)


def converged(device: ObservedDevice | None, desired: DeviceConfig) -> bool:
    """Nothing left to change (a desired endpoint of None accepts whatever the device has)."""
    assert device is not None
    return diff_device(desired, device) == []


# --- the fake and sync() --------------------------------------------------------------------------


def test_backends_satisfy_the_protocol(tmp_path: Path):
    assert isinstance(FakeWireGuard(), WireGuardBackend)
    assert isinstance(UserspaceBackend(socket_dir=tmp_path), WireGuardBackend)
    assert FakeWireGuard.name == "fake" and UserspaceBackend.name == "userspace"


async def test_fake_device_lifecycle():
    fake = FakeWireGuard()
    assert await fake.get() is None
    with pytest.raises(WireGuardError) as e:
        await fake.apply([SetDevice(listen_port=1)])
    assert e.value.errno == errno.ENODEV
    await fake.ensure_device()
    await fake.ensure_device()
    assert await fake.get() == ObservedDevice() and fake.ensure_calls == 2
    await fake.close(remove=True)
    assert fake.closed and fake.removed_on_close and await fake.get() is None


async def test_sync_missing_device_is_enodev():
    with pytest.raises(WireGuardError) as e:
        await sync(FakeWireGuard(), BASE)
    assert e.value.errno == errno.ENODEV


async def test_sync_applies_difference_then_writes_nothing():
    fake = FakeWireGuard(exists=True)
    ops = await sync(fake, BASE)
    assert converged(await fake.get(), BASE)
    assert fake.applies == [tuple(ops)] and len(ops) == 4  # device + 3 peers
    assert await sync(fake, BASE) == []
    assert fake.writes == 1 and len(fake.applies) == 1  # no apply call at all


async def test_sync_one_peer_changed_touches_only_that_peer():
    fake = FakeWireGuard(exists=True)
    await sync(fake, BASE)
    changed = config(*(p for k, p in BASE.peers.items() if k != key(2)), peer(2, "10.0.0.2/32"))
    ops = await sync(fake, changed)
    assert ops == [
        UpdatePeer(key(2), persistent_keepalive=0, allowed_ips=frozenset({ip_network("10.0.0.2/32")}))
    ]
    dropped = config(*(p for k, p in changed.peers.items() if k != key(3)))
    assert await sync(fake, dropped) == [RemovePeer(key(3))]
    assert converged(await fake.get(), dropped)


async def test_sync_rereads_and_rediffs_after_partial_failure(caplog: pytest.LogCaptureFixture):
    fake = FakeWireGuard(exists=True)
    fake.fail_next_apply(WireGuardError(errno.EADDRINUSE, "port taken"), after=2)
    with caplog.at_level(logging.INFO, "kubespan.wireguard"):
        ops = await sync(fake, BASE)
    assert converged(await fake.get(), BASE)
    first, second = fake.applies
    assert len(first) == 4 and len(second) == 2  # only what the failed batch did not apply
    assert list(second) == ops and all(isinstance(op, AddPeer) for op in ops)
    msgs = [r.getMessage() for r in caplog.records]
    assert "wireguard apply failed, re-reading" in msgs and "wireguard apply retried" in msgs


async def test_sync_failure_that_landed_needs_no_second_write():
    fake = FakeWireGuard(exists=True)
    fake.fail_next_apply(after=4)  # all applied, then an error (e.g. a lost answer)
    ops = await sync(fake, BASE)
    assert len(ops) == 4 and fake.writes == 1 and converged(await fake.get(), BASE)


async def test_sync_second_failure_propagates():
    fake = FakeWireGuard(exists=True)
    fake.fail_next_apply(after=1)
    fake.fail_next_apply(WireGuardError(errno.EIO, "still broken"))
    with pytest.raises(WireGuardError) as e:
        await sync(fake, BASE)
    assert e.value.errno == errno.EIO and fake.writes == 2


async def test_sync_get_failure_propagates_without_writing():
    fake = FakeWireGuard(exists=True)
    fake.fail_next_get()
    with pytest.raises(WireGuardError):
        await sync(fake, BASE)
    assert fake.applies == []


async def test_fake_traffic_and_restart():
    fake = FakeWireGuard(exists=True, clock=lambda: 1234.5)
    await sync(fake, BASE)
    fake.traffic(key(1), rx=100, tx=40, handshake=True)
    fake.traffic(key(1), rx=1)
    fake.traffic(key(2), handshake=99.0)
    dev = await fake.get()
    assert dev is not None
    p1, p2 = dev.peers[key(1)], dev.peers[key(2)]
    assert (p1.rx_bytes, p1.tx_bytes, p1.last_handshake) == (101, 40, 1234.5)
    assert p2.last_handshake == 99.0 and dev.peers[key(3)].last_handshake is None
    with pytest.raises(KeyError):
        fake.traffic(key(9), rx=1)
    # counters are not configuration: nothing to write
    assert await sync(fake, BASE) == []
    fake.restart()
    assert len(await sync(fake, BASE)) == 4


# --- UAPI client against an in-test server ---------------------------------------------------------


@pytest.fixture
async def server(tmp_path: Path):
    async with FakeUapiServer(tmp_path / "wg0.sock") as srv:
        yield srv


async def test_client_set_get_roundtrip_and_counters(server: FakeUapiServer):
    client = UapiClient(server.path)
    assert await client.get() == ObservedDevice()

    ops = diff_device(BASE, ObservedDevice())
    await client.set(ops)
    assert converged(await client.get(), BASE)
    assert (client.gets, client.sets, client.requests) == (2, 1, 3)
    assert client.last_set_ops == tuple(ops)
    await client.set([])  # nothing to send: no request at all
    assert client.requests == 3 and server.requests == ["get", "set", "get"]


async def test_client_missing_and_stale_socket(tmp_path: Path):
    missing = tmp_path / "nope.sock"
    with pytest.raises(WireGuardError) as e:
        await UapiClient(missing).get()
    assert e.value.errno == errno.ENOENT and str(missing) in str(e.value)
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nothing listens: like a SIGKILLed wireguard-go
    with pytest.raises(WireGuardError) as e:
        await UapiClient(stale).set([SetDevice(listen_port=1)])
    assert e.value.errno == errno.ECONNREFUSED and str(stale) in str(e.value)


async def test_client_timeout_and_hang_up(server: FakeUapiServer):
    server.delay = 1.0
    with pytest.raises(WireGuardError) as e:
        await UapiClient(server.path, timeout=0.1).get()
    assert e.value.errno == errno.ETIMEDOUT and str(server.path) in str(e.value)
    server.delay = 0
    server.hang_up = True
    with pytest.raises(WireGuardError) as e:
        await UapiClient(server.path).get()
    assert e.value.errno == errno.ECONNRESET


async def test_client_set_error_carries_errno_and_no_key(server: FakeUapiServer):
    client = UapiClient(server.path)
    server.device.fail_next_apply(WireGuardError(errno.EINVAL, "bad"), after=1)

    with pytest.raises(WireGuardError) as e:
        await client.set(diff_device(BASE, ObservedDevice()))
    assert e.value.errno == errno.EINVAL
    assert "may have been applied" in str(e.value)
    assert PRIV.hex not in str(e.value) and PRIV.b64 not in str(e.value)
    # not transactional: the device-level line landed
    dev = await client.get()
    assert dev.private_key == PRIV and not dev.peers


async def test_client_reads_answer_after_early_error_on_large_request(server: FakeUapiServer):
    """wireguard-go answers a bad first line and stops reading: the errno must win over the broken pipe."""
    server.reject_next_set = -errno.EADDRINUSE
    many = config(
        *(peer(n, f"fd00::{n:x}/128", endpoint=f"192.0.2.{n % 250 + 1}:51820") for n in range(6000))
    )

    ops = diff_device(many, ObservedDevice())
    assert len(uapi.encode_set(ops) or b"") > 1_000_000  # well beyond the socket buffers
    with pytest.raises(WireGuardError) as e:
        await UapiClient(server.path).set(ops)
    assert e.value.errno == errno.EADDRINUSE


async def test_client_large_get(server: FakeUapiServer):
    many = config(*(peer(n, f"fd00::{n:x}/128", f"10.{n >> 8}.{n & 255}.0/24") for n in range(1000)))

    client = UapiClient(server.path)
    await client.set(diff_device(many, ObservedDevice()))
    assert converged(await client.get(), many)


async def test_client_protocol_error(tmp_path: Path):
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"private_key=zz\nerrno=0\n\n")
        await writer.drain()
        writer.close()

    path = tmp_path / "bad.sock"
    srv = await asyncio.start_unix_server(garbage, path=str(path))
    try:
        with pytest.raises(WireGuardError) as e:
            await UapiClient(path).get()
        assert e.value.errno == errno.EPROTO
    finally:
        srv.close()
        await srv.wait_closed()


# --- supervision, with a stub daemon (python -m kubespan.wireguard.fake) ---------------------------

STUB = [sys.executable, "-m", "kubespan.wireguard.fake"]


def stub_backend(tmp_path: Path, **kw) -> UserspaceBackend:
    kw.setdefault("binary", STUB)
    return UserspaceBackend(
        "wg-stub",
        socket_dir=tmp_path,
        private_mount=False,
        env={"KUBESPAN_FAKE_WG_DIR": str(tmp_path)},
        backoff_initial=0.02,
        backoff_max=0.1,
        **kw,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


async def wait_for(cond, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_command_line(tmp_path: Path):
    be = UserspaceBackend(
        "kubespan", socket_dir="/run/wireguard", command_prefix=["ip", "netns", "exec", "n1"]
    )
    assert be.command() == ["ip", "netns", "exec", "n1", "wireguard-go", "-f", "kubespan"]
    be = UserspaceBackend(
        "kubespan", socket_dir=tmp_path / "my dir", command_prefix=["ip", "netns", "exec", "n1"]
    )
    argv = be.command()
    assert argv[:9] == ["ip", "netns", "exec", "n1", "unshare", "--mount", "--propagation", "private", "sh"]
    assert argv[9:] == [
        "-c",
        f"mkdir -p /var/run/wireguard && mount --bind '{tmp_path / 'my dir'}' /var/run/wireguard"
        " && exec wireguard-go -f kubespan",
    ]
    assert be.socket_path == tmp_path / "my dir" / "kubespan.sock"


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"ifname": "x" * 16}, "ifname"),
        ({"ifname": "a/b"}, "ifname"),
        ({"request_timeout": 0}, "request_timeout"),
    ],
)
def test_constructor_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        UserspaceBackend(**kw)


async def test_spawn_supervise_restart_and_remove(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    restarted = asyncio.Event()
    calls = 0

    async def on_restart() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("engine hiccup")  # logged; supervision goes on
        restarted.set()

    be = stub_backend(tmp_path, on_restart=on_restart)
    caplog.set_level(logging.INFO, "kubespan.wireguard")
    try:
        assert await be.get() is None
        await be.ensure_device()
        pid = be.pid
        assert pid and not be.adopted and be.supervising
        await be.ensure_device()
        assert be.pid == pid  # idempotent
        await sync(be, BASE)
        assert converged(await be.get(), BASE)
        sets = be.client.sets
        assert await sync(be, BASE) == [] and be.client.sets == sets

        for n in (1, 2):
            os.kill(be.pid, signal.SIGKILL)
            await wait_for(lambda n=n: be.restarts == n and calls == n)
        await asyncio.wait_for(restarted.wait(), 5)
        assert be.pid not in (None, pid) and be.supervising
        assert await be.get() == ObservedDevice()  # a restarted daemon is empty: on_restart re-applies
    finally:
        last = be.pid
        await be.close(remove=True)
    assert last and not alive(last)
    assert not be.socket_path.exists() and be.pid is None
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count("wireguard-go exited") == 2 and msgs.count("wireguard-go restarted") == 2
    assert "wireguard-go on_restart failed" in msgs and "wireguard-go stopped" in msgs
    assert all(PRIV.hex not in r.getMessage() + str(getattr(r, "_fields", "")) for r in caplog.records)


async def test_restart_failures_back_off_and_recover(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    be = stub_backend(tmp_path, start_timeout=2)
    caplog.set_level(logging.INFO, "kubespan.wireguard")
    await be.ensure_device()
    try:
        be.binary = [sys.executable, "-c", "import sys; print('cannot create TUN'); sys.exit(1)"]
        os.kill(be.pid, signal.SIGKILL)
        await wait_for(
            lambda: sum(r.getMessage() == "wireguard-go restart failed" for r in caplog.records) >= 3
        )
        failed = [r for r in caplog.records if r.getMessage() == "wireguard-go restart failed"]
        delays = [r._fields["retry_in_s"] for r in failed]  # type: ignore[attr-defined]
        assert delays[:3] == [0.04, 0.08, 0.1]  # doubling, capped at backoff_max
        assert "cannot create TUN" in failed[0]._fields["error"]  # type: ignore[attr-defined]
        assert be.restarts == 0
        be.binary = STUB
        await wait_for(lambda: be.restarts == 1)
        assert await be.get() == ObservedDevice()
    finally:
        await be.close(remove=True)


async def test_close_without_remove_leaves_it_running_and_next_backend_adopts(tmp_path: Path):
    first = stub_backend(tmp_path)
    await first.ensure_device()
    await sync(first, BASE)
    pid = first.pid
    assert pid
    await first.close(remove=False)
    try:
        assert alive(pid) and first.pid is None
        restarted = asyncio.Event()

        async def on_restart() -> None:
            restarted.set()

        second = stub_backend(tmp_path, on_restart=on_restart)
        await second.ensure_device()
        assert second.pid == pid and second.adopted
        assert await sync(second, BASE) == []  # the adopted daemon kept its configuration
        os.kill(pid, signal.SIGKILL)  # an adopted daemon is watched too
        await asyncio.wait_for(restarted.wait(), 5)
        assert second.pid not in (None, pid) and not second.adopted
        await second.close(remove=True)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


async def test_replace_existing(tmp_path: Path):
    first = stub_backend(tmp_path)
    await first.ensure_device()
    pid = first.pid
    await first.close(remove=False)
    second = stub_backend(tmp_path, existing="replace")
    try:
        await second.ensure_device()
        assert second.pid != pid and not second.adopted
        assert pid and not alive(pid)
    finally:
        await second.close(remove=True)
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


async def test_socket_served_by_unknown_process_is_an_error(server: FakeUapiServer):
    be = UserspaceBackend(server.path.stem, socket_dir=server.path.parent, private_mount=False)
    with pytest.raises(WireGuardError) as e:
        await be.ensure_device()
    assert e.value.errno == errno.EEXIST and str(server.path) in str(e.value)
    assert not be.supervising


async def test_start_failures_are_clear(tmp_path: Path):
    be = stub_backend(tmp_path, binary=["/nonexistent/wireguard-go"])
    with pytest.raises(WireGuardError) as e:
        await be.ensure_device()
    assert e.value.errno == errno.ENOENT and "/nonexistent/wireguard-go" in str(e.value)

    be = stub_backend(
        tmp_path, binary=[sys.executable, "-c", "print('Failed to create TUN device'); exit(1)"]
    )
    with pytest.raises(WireGuardError) as e:
        await be.ensure_device()
    assert e.value.errno == errno.ECHILD and "Failed to create TUN device" in str(e.value)

    be = stub_backend(
        tmp_path,
        binary=[sys.executable, "-c", "import time; time.sleep(30)"],
        start_timeout=0.3,
        stop_timeout=1,
    )
    with pytest.raises(WireGuardError) as e:
        await be.ensure_device()
    assert e.value.errno == errno.ETIMEDOUT and not be.supervising
    out = (tmp_path / "wg-stub.log").read_text()
    assert "Failed to create TUN device" in out

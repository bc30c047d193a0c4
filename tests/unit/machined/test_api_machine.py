"""machine.MachineService servicer with a fake gRPC context: envelope, roles, OS-only calls, config
apply, services, logs, events, dmesg and the /proc readers."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import duration_pb2, empty_pb2

from machined import pki
from machined.api import NOT_OS, MachineServicer, node_error
from machined.api.sysinfo import format_kmsg
from machined.api.testing import Aborted, FakeContext, collect
from machined.config import ConfigManager, ConfigStore
from machined.config.testing import config_yaml, new_secret
from machined.daemon import MachineEvents
from machined.daemon.logcapture import install, make_rings, uninstall
from machined.services import EventRing, LogRing, Service, ServiceState, Supervisor
from machined.services.fake import FakeSpawner
from machined.state import DEFINITIONS, State, register_all
from spanapi.talos.common import common_pb2
from spanapi.talos.machine import machine_pb2

READER, OPERATOR, ADMIN = ["os:reader"], ["os:operator"], ["os:admin"]
AUTO = machine_pb2.ApplyConfigurationRequest.AUTO
T = 5.0
SECRET = new_secret()


@dataclass
class FakeNode:
    config: ConfigManager
    supervisor: Supervisor | None
    state: State = field(default_factory=State)
    events: MachineEvents = field(default_factory=MachineEvents)
    machined_events: EventRing = field(default_factory=EventRing)
    rings: dict[str, LogRing] = field(default_factory=make_rings)
    hostname: str = "node-1"

    def log_ring(self, id: str) -> LogRing | None:
        if id in self.rings:
            return self.rings[id]
        if self.supervisor is not None and id in self.supervisor.names():
            return self.supervisor.logs(id)
        return None


def cfg(**kw: Any) -> str:
    return config_yaml(cluster_id="api-test", secret=SECRET, **kw)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[FakeNode]:
    mgr = ConfigManager(ConfigStore(tmp_path / "state"))
    mgr.boot(__import__("machined.config", fromlist=["MachineConfig"]).MachineConfig.parse(cfg()))
    sup = Supervisor([Service("web", ("web",))], spawner=FakeSpawner())
    async with sup:
        n = FakeNode(mgr, sup)
        register_all(n.state, DEFINITIONS)
        yield n


@pytest.fixture
def api(node: FakeNode, tmp_path: Path) -> MachineServicer:
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "meminfo").write_text(
        "MemTotal:       16316412 kB\nMemFree:         1234567 kB\nMemAvailable:    9876543 kB\n"
        "Active(anon):      4242 kB\nHugePages_Total:       0\nSomethingNew:       7 kB\n"
    )
    (proc / "loadavg").write_text("0.52 0.58 0.59 2/1234 56789\n")
    (proc / "net" / "dev").write_text(
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
        "    lo:  1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0\n"
        "  eth0:  5000      50    1    2    0     0          0         3     7000      70    0    0    0     0       0          0\n"
    )
    head = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    )
    (proc / "net" / "tcp").write_text(
        head
        + "   0: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0\n"
        + "   1: 0B01010A:C350 0C01010A:094F 01 00000000:00000000 02:000003E8 00000000     0        0 222 1 0000000000000000 20 4 30 10 -1\n"
    )
    (proc / "net" / "udp6").write_text(
        head
        + "  1: 00000000000000000000000000000000:CA6C 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 333 2 0000000000000000 0\n"
    )
    return MachineServicer(node, proc=proc, kmsg=tmp_path / "no-kmsg")


async def call(method: Any, request: Any, roles: list[str] | None = None) -> Any:
    return await method(request, FakeContext(roles))


async def aborted(method: Any, request: Any, roles: list[str] | None = None) -> Aborted:
    with pytest.raises(Aborted) as e:
        r = method(request, FakeContext(roles))
        if hasattr(r, "__anext__"):
            await collect(r, limit=1)
        else:
            await r
    return e.value


# --- envelope and roles ---------------------------------------------------------------------------


async def test_every_reply_item_carries_the_hostname(api):
    E = empty_pb2.Empty()
    for method, req in (
        (api.Version, E),
        (api.Hostname, E),
        (api.ServiceList, E),
        (api.Memory, E),
        (api.LoadAvg, E),
        (api.NetworkDeviceStats, E),
        (api.Netstat, machine_pb2.NetstatRequest()),
        (
            api.ApplyConfiguration,
            machine_pb2.ApplyConfigurationRequest(data=cfg().encode(), mode=AUTO, dry_run=True),
        ),
    ):
        resp = await call(method, req, None if method == api.ApplyConfiguration else READER)
        assert len(resp.messages) == 1 and resp.messages[0].metadata.hostname == "node-1", method
    v = (await call(api.Version, E)).messages[0]
    assert v.version.tag.startswith("v") and v.features.rbac and v.platform.mode == "agent"


def test_node_error_envelope_is_what_a_proxy_sends_for_a_failed_node():
    r = node_error(machine_pb2.VersionResponse, "10.0.0.9", grpc.StatusCode.UNAVAILABLE, "connection refused")
    md = r.messages[0].metadata
    assert (md.hostname, md.error, md.status.code, md.status.message) == (
        "10.0.0.9",
        "connection refused",
        grpc.StatusCode.UNAVAILABLE.value[0],
        "connection refused",
    )


async def test_roles_follow_talos_rules(api):
    apply = machine_pb2.ApplyConfigurationRequest(data=cfg().encode(), mode=AUTO, dry_run=True)
    for roles in (READER, OPERATOR):
        e = await aborted(api.ApplyConfiguration, apply, roles)
        assert e.code is grpc.StatusCode.PERMISSION_DENIED and e.details == "not authorized"
    await call(api.ApplyConfiguration, apply, ADMIN)
    await call(api.ApplyConfiguration, apply, None)  # no metadata: a local socket caller is admin
    e = await aborted(api.ServiceStop, machine_pb2.ServiceStopRequest(id="web"), READER)
    assert e.code is grpc.StatusCode.PERMISSION_DENIED
    await call(api.ServiceStop, machine_pb2.ServiceStopRequest(id="web"), OPERATOR)
    e = await aborted(api.Logs, machine_pb2.LogsRequest(id="machined"), ["os:etcd:backup"])
    assert e.code is grpc.StatusCode.PERMISSION_DENIED
    # one role per talos-role value: a comma-separated value is no role (and grants nothing)
    await call(api.ServiceStart, machine_pb2.ServiceStartRequest(id="web"), ["os:reader", "os:operator"])
    for joined in ("os:reader, os:operator", "x,os:admin"):
        e = await aborted(api.ServiceStart, machine_pb2.ServiceStartRequest(id="web"), [joined])
        assert e.code is grpc.StatusCode.PERMISSION_DENIED


async def test_os_only_calls_answer_failed_precondition(api):
    for method, req in (
        (api.Reboot, machine_pb2.RebootRequest()),
        (api.Shutdown, machine_pb2.ShutdownRequest()),
        (api.Upgrade, machine_pb2.UpgradeRequest()),
        (api.Reset, machine_pb2.ResetRequest()),
    ):
        e = await aborted(method, req)
        assert e.code is grpc.StatusCode.FAILED_PRECONDITION and e.details == NOT_OS
    assert (await aborted(api.Reboot, machine_pb2.RebootRequest(), OPERATOR)).details == NOT_OS
    assert (
        await aborted(api.Reset, machine_pb2.ResetRequest(), OPERATOR)
    ).code is grpc.StatusCode.PERMISSION_DENIED
    assert (
        await aborted(api.Reboot, machine_pb2.RebootRequest(), READER)
    ).code is grpc.StatusCode.PERMISSION_DENIED


# --- config ------------------------------------------------------------------------------------------------


async def test_apply_dry_run_returns_the_diff_and_changes_nothing(api, node):
    before = node.config.running
    new = cfg(services=[{"name": "extra", "command": "extra"}])
    r = (
        await call(
            api.ApplyConfiguration,
            machine_pb2.ApplyConfigurationRequest(data=new.encode(), mode=AUTO, dry_run=True),
        )
    ).messages[0]
    assert r.mode == machine_pb2.ApplyConfigurationRequest.NO_REBOOT
    assert r.mode_details.startswith("Dry run summary:") and "Config diff:" in r.mode_details
    assert "+name: extra" in r.mode_details and "services added: extra" in r.mode_details
    assert SECRET not in r.mode_details
    assert node.config.running is before


async def test_apply_modes_and_errors(api, node):
    new = cfg(services=[{"name": "extra", "command": "extra"}])
    r = (await call(api.ApplyConfiguration, machine_pb2.ApplyConfigurationRequest(
        data=new.encode(), mode=machine_pb2.ApplyConfigurationRequest.STAGED
    ))).messages[0]  # fmt: skip
    assert r.mode == machine_pb2.ApplyConfigurationRequest.STAGED and "next agent start" in r.mode_details
    assert node.config.running.service("extra") is None and node.config.staged is not None

    r = (await call(api.ApplyConfiguration, machine_pb2.ApplyConfigurationRequest(
        data=new.encode(), mode=machine_pb2.ApplyConfigurationRequest.TRY,
        try_mode_timeout=duration_pb2.Duration(seconds=90),
    ))).messages[0]  # fmt: skip
    assert r.mode == machine_pb2.ApplyConfigurationRequest.TRY and "90 s" in r.mode_details
    assert node.config.pending is not None and node.config.pending.timeout == 90
    node.config.close()

    e = await aborted(api.ApplyConfiguration, machine_pb2.ApplyConfigurationRequest(
        data=new.encode(), mode=machine_pb2.ApplyConfigurationRequest.REBOOT
    ))  # fmt: skip
    assert e.code is grpc.StatusCode.UNIMPLEMENTED  # also what a request without a mode gets, as on Talos
    e = await aborted(
        api.ApplyConfiguration, machine_pb2.ApplyConfigurationRequest(data=new.encode(), mode=9)
    )
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT

    bad = new.replace("type: worker", "type: toaster")
    e = await aborted(
        api.ApplyConfiguration, machine_pb2.ApplyConfigurationRequest(data=bad.encode(), mode=AUTO)
    )
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT and "machine.type" in e.details
    [ev] = [
        x
        for x in node.events.history(tail_events=-1)
        if x.message.DESCRIPTOR.name == "ConfigValidationErrorEvent"
    ]
    assert "machine.type" in ev.message.error


async def test_hostile_configs_are_invalid_argument_naming_the_limit(api, node):
    persisted = node.config.store.active_path.read_bytes()
    running = node.config.running
    bomb = "version: v1alpha1\nx:\n  a0: &a0 [lol]\n" + "".join(
        f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 7)
    )
    cases = {
        bomb: "config: alias expansion exceeds 100000 nodes",
        "[" * 50_000: "config: nesting deeper than 64 levels",
        "{a: " * 5_000: "config: nesting deeper than 64 levels",
        "x: " + "y" * 20_000_000: "config: 20000003 bytes, limit 4194304",
        "---\nversion: v1alpha1\n" * 10_000: "config: more than 64 documents",
    }
    for text, expected in cases.items():
        for dry_run in (True, False):
            e = await aborted(api.ApplyConfiguration, machine_pb2.ApplyConfigurationRequest(
                data=text.encode(), mode=AUTO, dry_run=dry_run
            ))  # fmt: skip
            assert e.code is grpc.StatusCode.INVALID_ARGUMENT, (expected, e)
            assert expected in e.details and len(e.details) < 1024
    assert node.config.running is running and node.config.store.active_path.read_bytes() == persisted
    assert node.config.staged is None


async def test_many_problems_give_a_bounded_status(api, node):
    docs = cfg().split("---\n")
    many = "---\n".join([*docs, *([docs[-1]] * 60)])  # 60 duplicate documents, one problem each
    e = await aborted(
        api.ApplyConfiguration, machine_pb2.ApplyConfigurationRequest(data=many.encode(), mode=AUTO)
    )
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "(60 problems)" in e.details and e.details.endswith("and 50 more") and len(e.details) < 4096
    [ev] = [
        x
        for x in node.events.history(tail_events=-1)
        if x.message.DESCRIPTOR.name == "ConfigValidationErrorEvent"
    ]
    assert ev.message.error == e.details


async def test_huge_try_mode_timeout_is_invalid_argument(api, node):
    for seconds in (2**62, 86_401, 0, -1):
        e = await aborted(api.ApplyConfiguration, machine_pb2.ApplyConfigurationRequest(
            data=cfg().encode(), mode=machine_pb2.ApplyConfigurationRequest.TRY,
            try_mode_timeout=duration_pb2.Duration(seconds=seconds),
        ))  # fmt: skip
        assert e.code is grpc.StatusCode.INVALID_ARGUMENT, seconds
        assert e.details.startswith("try_mode_timeout: must be greater than 0 and at most 86400 s")
    assert node.config.pending is None
    # other modes ignore the field (talosctl always sends it), without overflowing
    r = (await call(api.ApplyConfiguration, machine_pb2.ApplyConfigurationRequest(
        data=cfg().encode(), mode=AUTO, dry_run=True, try_mode_timeout=duration_pb2.Duration(seconds=2**62),
    ))).messages[0]  # fmt: skip
    assert r.mode_details.startswith("Dry run summary:")


def test_status_messages_fit_in_grpc_trailers():
    from machined.api.machine import MAX_STATUS_BYTES, status_message

    def encoded(text: str) -> int:  # grpc-message percent-encoding
        return sum(1 if " " <= c <= "~" and c != "%" else 3 * len(c.encode()) for c in text)

    assert status_message("short: fine") == "short: fine"
    for text in ("x" * 100_000, "é" * 100_000, "\n%" * 100_000, "🙂" * 10_000, "x" * MAX_STATUS_BYTES):
        out = status_message(text)
        assert encoded(out) <= MAX_STATUS_BYTES and text.startswith(out.removesuffix(" ... (truncated)"))
    assert status_message("x" * MAX_STATUS_BYTES) == "x" * MAX_STATUS_BYTES


# --- services ----------------------------------------------------------------------------------------------


async def test_service_list_start_stop_restart(api, node):
    sup = node.supervisor
    r = (await call(api.ServiceStart, machine_pb2.ServiceStartRequest(id="web"))).messages[0]
    assert r.resp == 'Service "web" started'
    async with asyncio.timeout(T):
        await sup.wait_state("web", ServiceState.RUNNING)
    node.machined_events.append(
        __import__("machined.services", fromlist=["ServiceEvent"]).ServiceEvent(
            1, "machined", ServiceState.RUNNING, "Mesh ready", 1.0
        )
    )
    [lst] = (await call(api.ServiceList, empty_pb2.Empty(), READER)).messages
    by_id = {s.id: s for s in lst.services}
    assert list(by_id) == ["machined", "web"]
    assert by_id["machined"].events.events[0].msg == "Mesh ready"
    web = by_id["web"]
    assert web.state == "Running" and web.health.healthy and not web.health.unknown
    assert [e.state for e in web.events.events] == ["Starting", "Preparing", "Running"]
    r = (await call(api.ServiceRestart, machine_pb2.ServiceRestartRequest(id="web"), OPERATOR)).messages[0]
    assert r.resp == 'Service "web" restarted'
    async with asyncio.timeout(T):
        await sup.wait_state("web", ServiceState.RUNNING)
    assert len(sup.spawner.spawned) == 2
    r = (await call(api.ServiceStop, machine_pb2.ServiceStopRequest(id="web"))).messages[0]
    assert r.resp == 'Service "web" stopped' and sup.status("web").state is ServiceState.FINISHED

    e = await aborted(api.ServiceStart, machine_pb2.ServiceStartRequest(id="nope"))
    assert e.code is grpc.StatusCode.NOT_FOUND and '"nope"' in e.details
    e = await aborted(api.ServiceStop, machine_pb2.ServiceStopRequest(id="machined"))
    assert e.code is grpc.StatusCode.FAILED_PRECONDITION


# --- logs, events, dmesg -----------------------------------------------------------------------------------


async def test_logs_tail_and_follow(api, node):
    ring = node.supervisor.logs("web")
    for i in range(5):
        ring.append(f"line {i}")
    out = await collect(api.Logs(machine_pb2.LogsRequest(id="web", tail_lines=2), FakeContext()))
    assert b"".join(d.bytes for d in out) == b"line 3\nline 4\n"
    assert all(d.metadata.hostname == "node-1" for d in out)
    out = await collect(api.Logs(machine_pb2.LogsRequest(id="web", tail_lines=-1), FakeContext()))
    assert b"".join(d.bytes for d in out).count(b"\n") == 5

    stream = api.Logs(machine_pb2.LogsRequest(id="web", tail_lines=1, follow=True), FakeContext())
    got = [await stream.__anext__()]
    ring.append("live")
    async with asyncio.timeout(T):
        got.append(await stream.__anext__())
    await stream.aclose()
    assert [d.bytes for d in got] == [b"line 4\n", b"live\n"]

    e = await aborted(api.Logs, machine_pb2.LogsRequest(id="nope"))
    assert e.code is grpc.StatusCode.NOT_FOUND

    # talosctl logs -k (namespace k8s.io, CRI driver): no Kubernetes containers here, even one named
    # like a service
    for req in (
        machine_pb2.LogsRequest(id="web", namespace="k8s.io", driver=common_pb2.CRI),
        machine_pb2.LogsRequest(id="web", namespace="k8s.io"),
    ):
        e = await aborted(api.Logs, req)
        assert e.code is grpc.StatusCode.NOT_FOUND and "no Kubernetes containers" in e.details
    out = await collect(
        api.Logs(machine_pb2.LogsRequest(id="web", namespace="system", tail_lines=-1), FakeContext())
    )
    assert out


async def test_machined_and_controller_runtime_logs_are_json_lines(api, node):
    h = install(node.rings)
    try:
        logging.getLogger("controller-runtime").warning("controller %r failed", "x")
        logging.getLogger("machined.mesh").warning("mesh started")
    finally:
        uninstall(h)
    cr = await collect(
        api.Logs(machine_pb2.LogsRequest(id="controller-runtime", tail_lines=-1), FakeContext())
    )
    md = await collect(api.Logs(machine_pb2.LogsRequest(id="machined", tail_lines=-1), FakeContext()))
    assert b'"msg":"controller \'x\' failed"' in b"".join(d.bytes for d in cr)
    machined = b"".join(d.bytes for d in md)
    assert b'"logger":"machined.mesh"' in machined and b"controller" not in machined


async def test_events_hello_tail_and_live(api, node):
    from machined.api.convert import service_state_event
    from machined.services import ServiceEvent

    for i in range(3):
        node.events.publish(service_state_event(ServiceEvent(i, "web", ServiceState.RUNNING, f"m{i}", 1.0)))
    stream = api.Events(machine_pb2.EventsRequest(tail_events=2), FakeContext(READER))
    hello = await stream.__anext__()
    assert hello.metadata.hostname == "node-1" and not hello.HasField("data")
    got = [await stream.__anext__() for _ in range(2)]
    assert [g.data.type_url for g in got] == ["talos/runtime/machine.ServiceStateEvent"] * 2
    msgs = [machine_pb2.ServiceStateEvent.FromString(g.data.value).message for g in got]
    assert msgs == ["m1", "m2"] and got[0].id < got[1].id and len(got[0].id) == 20
    node.events.publish(machine_pb2.ConfigValidationErrorEvent(error="bad"))
    async with asyncio.timeout(T):
        live = await stream.__anext__()
    assert live.data.type_url == "talos/runtime/machine.ConfigValidationErrorEvent"
    await stream.aclose()
    # tail_id: what came after a known event
    stream = api.Events(machine_pb2.EventsRequest(tail_id=got[0].id), FakeContext())
    await stream.__anext__()
    after = [await stream.__anext__() for _ in range(2)]
    assert after[0].id == got[1].id
    await stream.aclose()


async def test_dmesg_without_access_is_a_clear_error(api):
    e = await aborted(api.Dmesg, machine_pb2.DmesgRequest())
    assert e.code is grpc.StatusCode.FAILED_PRECONDITION and "cannot read the kernel log" in e.details


def test_kmsg_records_are_formatted_like_talos():
    assert format_kmsg(b"6,1234,5678901,-;eth0: link up\n SUBSYSTEM=net\n") == (
        "   kern:    info: [    5.678901]: eth0: link up"
    )
    assert (
        format_kmsg(b"30,1,2000000,-;systemd started\n")
        == " daemon:    info: [    2.000000]: systemd started"
    )
    assert format_kmsg(b"garbage") is None


# --- /proc ---------------------------------------------------------------------------------------------------


async def test_memory_loadavg_and_network_devices(api):
    m = (await call(api.Memory, empty_pb2.Empty())).messages[0].meminfo
    assert (m.memtotal, m.memfree, m.memavailable, m.activeanon) == (16316412, 1234567, 9876543, 4242)
    la = (await call(api.LoadAvg, empty_pb2.Empty())).messages[0]
    assert (la.load1, la.load5, la.load15) == (0.52, 0.58, 0.59)
    nd = (await call(api.NetworkDeviceStats, empty_pb2.Empty())).messages[0]
    assert [d.name for d in nd.devices] == ["lo", "eth0"]
    eth0 = nd.devices[1]
    assert (eth0.rx_bytes, eth0.rx_errors, eth0.rx_dropped, eth0.rx_multicast, eth0.tx_bytes) == (
        5000,
        1,
        2,
        3,
        7000,
    )
    assert nd.total.rx_bytes == 6000 and nd.total.tx_packets == 80


async def test_netstat_filters(api):
    req = machine_pb2.NetstatRequest
    every = (await call(api.Netstat, req())).messages[0].connectrecord
    assert [(r.l4proto, r.localip, r.localport) for r in every] == [
        ("tcp", "127.0.0.1", 3000),
        ("tcp", "10.1.1.11", 50000),
        ("udp6", "::", 51820),
    ]
    est = every[1]
    assert (est.remoteip, est.remoteport, est.state, est.inode) == (
        "10.1.1.12",
        2383,
        machine_pb2.ConnectRecord.ESTABLISHED,
        222,
    )
    listening = (await call(api.Netstat, req(filter=req.LISTENING))).messages[0].connectrecord
    assert [r.localport for r in listening] == [3000, 51820]
    tcp = (
        (await call(api.Netstat, req(l4proto=req.L4proto(tcp=True), filter=req.CONNECTED)))
        .messages[0]
        .connectrecord
    )
    assert [r.localport for r in tcp] == [50000]
    e = await aborted(api.Netstat, req(netns=req.NetNS(allnetns=True)))
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT


# --- client configuration -------------------------------------------------------------------------------------


async def test_generate_client_configuration(api, node):
    req = machine_pb2.GenerateClientConfigurationRequest(roles=["os:reader"])
    e = await aborted(api.GenerateClientConfiguration, req)
    assert e.code is grpc.StatusCode.FAILED_PRECONDITION and "machine.ca.key" in e.details

    ca = pki.generate_ca("talos")
    crt_pem, key_pem = ca.crt, ca.key
    docs = list(yaml.safe_load_all(cfg()))
    docs[0]["machine"]["ca"] = {
        "crt": base64.b64encode(crt_pem).decode(),
        "key": base64.b64encode(key_pem).decode(),
    }
    node.config.apply(yaml.safe_dump_all(docs))
    r = (await call(api.GenerateClientConfiguration, req)).messages[0]
    cert = x509.load_pem_x509_certificate(r.crt)
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == ["os:reader"]
    x509.load_pem_x509_certificate(crt_pem).public_key().verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )
    assert (
        isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        and cert.public_key().curve.name == "secp256r1"
    )
    tc = yaml.safe_load(r.talosconfig)
    ctx = tc["contexts"][tc["context"]]
    assert base64.b64decode(ctx["crt"]) == r.crt and base64.b64decode(ctx["ca"]) == crt_pem

    e = await aborted(
        api.GenerateClientConfiguration, machine_pb2.GenerateClientConfigurationRequest(roles=["os:root"])
    )
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT and "os:root" in e.details
    e = await aborted(api.GenerateClientConfiguration, req, OPERATOR)
    assert e.code is grpc.StatusCode.PERMISSION_DENIED


def test_client_certificates_from_an_ed25519_ca_and_the_ttl_limits():
    """A Talos-generated (Ed25519) CA signs client certificates for GenerateClientConfiguration, Ed25519
    ones as Talos's (apid and spanctl do TLS with OpenSSL, which handles them)."""

    import pytest

    from machined import pki
    from machined.api.certs import MAX_TTL, CertError, issue_client_certificate, talosconfig
    from machined.apid.testing import ed25519_ca
    from machined.gen import load_talosconfig_context

    ca = ed25519_ca()
    crt, key = issue_client_certificate(ca.crt, ca.key, ["os:reader"], dt.timedelta(hours=1))
    cert = pki.load_certificate(crt)
    cert.verify_directly_issued_by(pki.load_certificate(ca.crt))
    assert pki.roles_of(cert) == {"os:reader"} and pki.is_client_cert(cert)
    assert pki.key_algorithm(pki.load_private_key(key)) == "Ed25519"
    ctx = load_talosconfig_context(talosconfig("c", ca.crt, crt, key, ["10.0.0.1"]))
    assert ctx["endpoints"] == ["10.0.0.1"] and ctx["crt"] == crt and ctx["key"] == key
    for bad in (dt.timedelta(0), MAX_TTL + dt.timedelta(days=1)):
        with pytest.raises(CertError, match="crt_ttl"):
            issue_client_certificate(ca.crt, ca.key, ["os:reader"], bad)

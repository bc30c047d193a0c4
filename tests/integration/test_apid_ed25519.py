"""Talos's default PKI (Ed25519) end to end through real apid processes on loopback.

The cluster CA is Ed25519 with its key under Talos's ``ED25519 PRIVATE KEY`` PEM label, client
certificates are Ed25519 with roles in ``O=`` and EKU clientAuth (as Talos's ``NewKeyPair`` issues them
from an Ed25519 CA), the talosconfig-style client context holds them base64-encoded. The clients are
our Python-ssl dialer (grpcio's own TLS cannot offer Ed25519, grpc/grpc#24252). Covered: roles
enforced, a Talos apid's ``os:impersonator`` certificate with ``talos-role``, ``node`` forwarding and
``nodes`` fan-out across three apid processes, trustd signing a Talos worker's Ed25519 CSR and a
worker apid process getting its certificate from it, refusals (another CA, no certificate, a
server-only certificate), and spanctl's channel. ECDSA keeps working (the last test).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import empty_pb2

from machined import gen, pki, tlsterm
from machined.apid.testing import (
    apid_command,
    ed25519_ca,
    free_port,
    start_machined,
    stop_processes,
)
from machined.apid.trustd import request_certificate
from machined.state.catalog import KUBESPAN_IDENTITY, NS_KUBESPAN
from spanapi.talos.cosi import state_pb2, state_pb2_grpc
from spanapi.talos.machine import machine_pb2, machine_pb2_grpc

DENIED = grpc.StatusCode.PERMISSION_DENIED
TOKEN = "abcdef.0123456789abcdef"


def talos_label(key_pem: bytes) -> bytes:
    """Talos writes Ed25519 keys as PKCS#8 under ``ED25519 PRIVATE KEY``."""
    return key_pem.replace(b"BEGIN PRIVATE KEY", b"BEGIN ED25519 PRIVATE KEY").replace(
        b"END PRIVATE KEY", b"END ED25519 PRIVATE KEY"
    )


class TalosPki:
    """An Ed25519 CA as Talos generates it and client certificates as Talos issues them."""

    def __init__(self, ca: pki.KeyPair | None = None) -> None:
        self.ca = ca or ed25519_ca()
        assert pki.key_algorithm(self.ca.certificate) == "Ed25519"

    def client(self, *roles: str, cn: str = "talosctl") -> pki.KeyPair:
        kp = pki.issue_client(self.ca, list(roles), common_name=cn)
        assert pki.key_algorithm(kp.certificate) == "Ed25519"
        return pki.KeyPair(kp.crt, talos_label(kp.key))

    def configs(self, tmp: Path) -> tuple[Path, Path]:
        """controlplane.yaml (CA key with Talos's label) and worker.yaml (CA certificate only)."""
        secrets = gen.Secrets(
            cluster_id=base64.b64encode(b"c" * 32).decode(),
            cluster_secret=base64.b64encode(b"s" * 32).decode(),
            token=TOKEN,
            os_ca=pki.KeyPair(self.ca.crt, talos_label(self.ca.key)),
        )
        g = gen.gen_config("talos", "https://127.0.0.1:6443", secrets, discovery=["https://d.invalid/"])
        cp, wk = tmp / "controlplane.yaml", tmp / "worker.yaml"
        pki.write_secret_file(cp, g.controlplane)
        pki.write_secret_file(wk, g.worker)
        key = base64.b64decode(yaml.safe_load_all(g.controlplane).__next__()["machine"]["ca"]["key"])
        assert b"BEGIN ED25519 PRIVATE KEY" in key
        return cp, wk


def channel(port: int, ca: bytes, kp: pki.KeyPair | None) -> tlsterm.TlsChannel:
    ctx = tlsterm.client_context(ca, None, kp.crt if kp else None, kp.key if kp else None)
    return tlsterm.TlsChannel.create(f"127.0.0.1:{port}", ctx, [])


async def outcome(call) -> object:
    try:
        await call
        return "ok"
    except grpc.aio.AioRpcError as e:
        return e.code()


def spawn(tmp: Path, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*apid_command(), "--hostname", name, "--address", "127.0.0.1", *args],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / f"{name}.log", "w"),
    )


async def wait_serving(port: int, ca: bytes, kp: pki.KeyPair, log: Path, wait: float = 30) -> None:
    async with channel(port, ca, kp) as ch:
        m = machine_pb2_grpc.MachineServiceStub(ch)
        for _ in range(int(wait / 0.2)):
            try:
                await m.Version(empty_pb2.Empty(), timeout=2)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
    raise AssertionError((await asyncio.to_thread(log.read_text))[-2000:])


@pytest.fixture
async def talos_nodes(tmp_path):
    """Three control-plane apid processes (front, n1, n2) on an Ed25519 CA, each before a machined."""
    talos = TalosPki()
    cp, _ = talos.configs(tmp_path)
    servers, procs, ports = [], [], {}
    try:
        for name in ("front", "n1", "n2"):
            srv, sock = await start_machined(name, tmp_path)
            servers.append(srv)
            ports[name] = free_port()
            procs.append(
                spawn(tmp_path, name, "--config", str(cp), "--machined-socket", str(sock),
                      "--listen", f"127.0.0.1:{ports[name]}", "--trustd-listen", "off")
            )  # fmt: skip
        admin = talos.client("os:admin")
        for name in ports:
            await wait_serving(ports[name], talos.ca.crt, admin, tmp_path / f"{name}.log")
        yield talos, ports
    finally:
        await asyncio.to_thread(stop_processes, procs)
        for srv in servers:
            await srv.stop()


def sensitive_get(s: state_pb2_grpc.StateStub, md=()) -> object:
    return s.Get(
        state_pb2.GetRequest(namespace=NS_KUBESPAN, type=KUBESPAN_IDENTITY, id="local"),
        metadata=md,
        timeout=10,
    )


async def test_ed25519_roles_forwarding_and_fan_out(talos_nodes):
    talos, ports = talos_nodes
    ca = talos.ca.crt
    n1, n2 = f"127.0.0.1:{ports['n1']}", f"127.0.0.1:{ports['n2']}"

    # roles from the certificate's O= values are enforced
    async with channel(ports["front"], ca, talos.client("os:admin")) as ch:
        m, s = machine_pb2_grpc.MachineServiceStub(ch), state_pb2_grpc.StateStub(ch)
        v = await m.Version(empty_pb2.Empty(), timeout=10)
        assert v.messages[0].metadata.hostname == "front"
        assert "PRIVATE" in (await sensitive_get(s)).resource.spec.yaml_spec
        # forwarded with the front's os:impersonator certificate (Ed25519 too), admin role carried
        r = await sensitive_get(s, (("node", n2),))
        assert "PRIVATE" in r.resource.spec.yaml_spec
    async with channel(ports["front"], ca, talos.client("os:reader")) as ch:
        m, s = machine_pb2_grpc.MachineServiceStub(ch), state_pb2_grpc.StateStub(ch)
        assert await outcome(m.Version(empty_pb2.Empty(), timeout=10)) == "ok"
        assert await outcome(sensitive_get(s)) == DENIED
        restart = machine_pb2.ServiceRestartRequest(id="x")
        assert await outcome(m.ServiceRestart(restart, timeout=10)) == DENIED
        # a client-sent talos-role is ignored for a non-impersonator
        assert await outcome(sensitive_get(s, (("talos-role", "os:admin"),))) == DENIED

        # node forwarding: the reader stays a reader on the other node
        v = await m.Version(empty_pb2.Empty(), metadata=(("node", n1),), timeout=10)
        assert [x.metadata.hostname for x in v.messages] == [n1]
        assert await outcome(m.ServiceRestart(restart, metadata=(("node", n1),), timeout=10)) == DENIED
        assert await outcome(sensitive_get(s, (("node", n1),))) == DENIED

        # fan-out: unary replies merged, one item per node; a streaming call interleaved
        v = await m.Version(empty_pb2.Empty(), metadata=(("nodes", n1), ("nodes", n2)), timeout=10)
        assert sorted(x.metadata.hostname for x in v.messages) == sorted([n1, n2])
        assert not any(x.metadata.error for x in v.messages)
        logs = [
            x.bytes.decode().strip()
            async for x in m.Logs(
                machine_pb2.LogsRequest(id="machined", tail_lines=-1),
                metadata=(("nodes", f"{n1},{n2}"),),
                timeout=10,
            )
        ]
        assert sorted(logs) == ["hello from n1", "hello from n2"]


async def test_a_talos_apids_impersonator_certificate_carries_the_callers_roles(talos_nodes):
    """A Talos apid forwards with an Ed25519 ``O=os:impersonator`` certificate and ``talos-role``."""
    talos, ports = talos_nodes
    imp = talos.client("os:impersonator", cn="talos-cp-1")
    async with channel(ports["n1"], talos.ca.crt, imp) as ch:
        m, s = machine_pb2_grpc.MachineServiceStub(ch), state_pb2_grpc.StateStub(ch)
        as_reader = (("talos-role", "os:reader"), ("proxyfrom", "talos-cp-1"))
        v = await m.Version(empty_pb2.Empty(), metadata=as_reader, timeout=10)
        assert v.messages[0].metadata.hostname == "n1"
        assert await outcome(sensitive_get(s, as_reader)) == DENIED
        as_admin = (("talos-role", "os:admin"), ("proxyfrom", "talos-cp-1"))
        assert "PRIVATE" in (await sensitive_get(s, as_admin)).resource.spec.yaml_spec
        # without talos-role the impersonator's own role grants nothing here
        assert await outcome(m.Version(empty_pb2.Empty(), timeout=10)) == DENIED


@pytest.mark.parametrize("which", ["other-ca", "none", "server-only", "expired"])
async def test_ed25519_refusals(talos_nodes, which):
    talos, ports = talos_nodes
    now = dt.datetime.now(dt.UTC)
    kp = {
        "other-ca": TalosPki().client("os:admin"),
        "none": None,
        "server-only": pki.issue_server(talos.ca, ["127.0.0.1"], ["x"]),
        "expired": pki.issue_client(
            talos.ca, ["os:admin"], dt.timedelta(hours=1), now=now - dt.timedelta(hours=3)
        ),
    }[which]
    async with channel(ports["front"], talos.ca.crt, kp) as ch:
        got = await outcome(machine_pb2_grpc.MachineServiceStub(ch).Version(empty_pb2.Empty(), timeout=5))
    assert got in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED), got


async def test_a_server_from_another_ca_is_not_trusted_by_the_client(talos_nodes):
    _talos, ports = talos_nodes
    stranger = TalosPki()
    ch = channel(ports["front"], stranger.ca.crt, stranger.client("os:admin"))
    async with ch as c:
        got = await outcome(machine_pb2_grpc.MachineServiceStub(c).Version(empty_pb2.Empty(), timeout=5))
        assert got == grpc.StatusCode.UNAVAILABLE
        assert "server certificate not accepted" in (ch.dialer.last_error or "")


async def test_trustd_signs_a_talos_workers_ed25519_csr_and_a_worker_apid_serves(tmp_path):
    talos = TalosPki()
    cp, wk = talos.configs(tmp_path)
    cp_srv, cp_sock = await start_machined("cp-1", tmp_path)
    w_srv, w_sock = await start_machined("worker-1", tmp_path)
    cp_port, trustd_port, w_port = free_port(), free_port(), free_port()
    admin = talos.client("os:admin")
    procs = [
        spawn(tmp_path, "cp-1", "--config", str(cp), "--machined-socket", str(cp_sock),
              "--listen", f"127.0.0.1:{cp_port}", "--trustd-listen", f"127.0.0.1:{trustd_port}")
    ]  # fmt: skip
    try:
        await wait_serving(cp_port, talos.ca.crt, admin, tmp_path / "cp-1.log")
        # a Talos worker's request: an Ed25519 key (the CA's kind), the machine token
        kp = await asyncio.to_thread(
            request_certificate, talos.ca.crt, TOKEN, [f"127.0.0.1:{trustd_port}"], ["10.9.8.7"], "w-talos"
        )
        c = kp.certificate
        c.verify_directly_issued_by(talos.ca.certificate)
        assert pki.key_algorithm(c) == "Ed25519"
        assert c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.IPAddress
        ) == [__import__("ipaddress").ip_address("10.9.8.7")]
        # a wrong token is refused, and says so
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            await asyncio.to_thread(
                request_certificate, talos.ca.crt, "zzzzzz.zzzzzzzzzzzzzzzz", [f"127.0.0.1:{trustd_port}"],
                ["10.9.8.7"], "w",
            )  # fmt: skip

        procs.append(
            spawn(tmp_path, "worker-1", "--config", str(wk), "--machined-socket", str(w_sock),
                  "--listen", f"127.0.0.1:{w_port}", "--trustd-endpoint", f"127.0.0.1:{trustd_port}")
        )  # fmt: skip
        await wait_serving(w_port, talos.ca.crt, admin, tmp_path / "worker-1.log")
        async with channel(w_port, talos.ca.crt, talos.client("os:reader")) as ch:
            v = await machine_pb2_grpc.MachineServiceStub(ch).Version(empty_pb2.Empty(), timeout=10)
        assert v.messages[0].metadata.hostname == "worker-1"
        # the worker's server certificate came from trustd: Ed25519, signed by the cluster CA
        ctx = tlsterm.client_context(talos.ca.crt, None, admin.crt, admin.key)
        _r, w = await asyncio.open_connection("127.0.0.1", w_port, ssl=ctx, server_hostname="127.0.0.1")
        der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
        w.close()
        served = x509.load_der_x509_certificate(der)
        served.verify_directly_issued_by(talos.ca.certificate)
        assert pki.key_algorithm(served) == "Ed25519"
        log = (tmp_path / "cp-1.log").read_text()
        assert "trustd issued certificate" in log and "ipv4:127.0.0.1:" in log  # the TCP peer
        assert TOKEN not in log
    finally:
        await asyncio.to_thread(stop_processes, procs)
        await cp_srv.stop()
        await w_srv.stop()


async def test_spanctl_channel_with_a_talos_talosconfig(talos_nodes):
    """spanctl's connection from a talosconfig-style context holding Talos's Ed25519 PEMs."""
    from machined.spanctl.config import ClientConfig

    talos, ports = talos_nodes
    kp = talos.client("os:reader")
    text = yaml.safe_dump(
        {
            "context": "talos",
            "contexts": {
                "talos": {
                    "endpoints": [f"127.0.0.1:{ports['front']}"],
                    "nodes": [f"127.0.0.1:{ports['n1']}"],
                    "ca": base64.b64encode(talos.ca.crt).decode(),
                    "crt": base64.b64encode(kp.crt).decode(),
                    "key": base64.b64encode(kp.key).decode(),
                }
            },
        }
    )
    cfg = ClientConfig.parse(text)
    await asyncio.to_thread(_spanctl_calls, cfg, ports)


def _spanctl_calls(cfg: object, ports: dict[str, int]) -> None:
    """spanctl's synchronous calls (in a thread: the test's loop serves the fake machined)."""
    from machined.spanctl.client import Target, describe_rpc_error

    t = Target.from_args(cfg)
    try:
        stub = machine_pb2_grpc.MachineServiceStub(t.channel())
        v = stub.Version(empty_pb2.Empty(), metadata=t.fanout_metadata(), timeout=10)
        assert [x.metadata.hostname for x in v.messages] == [f"127.0.0.1:{ports['n1']}"]
        with pytest.raises(grpc.RpcError) as e:
            stub.ServiceRestart(machine_pb2.ServiceRestartRequest(id="x"), timeout=10)
        assert e.value.code() == DENIED
    finally:
        t.close()
    # a dead endpoint: the error names it, not the private unix socket
    dead = free_port()
    t = Target.from_args(cfg, endpoints=[f"127.0.0.1:{dead}"])
    try:
        with pytest.raises(grpc.RpcError) as e:
            machine_pb2_grpc.MachineServiceStub(t.channel()).Version(empty_pb2.Empty(), timeout=5)
        text = describe_rpc_error(e.value, t.where)
        assert f"127.0.0.1:{dead}" in text and "tlsdial" not in text, text
    finally:
        t.close()


async def test_ecdsa_still_works_through_the_same_path(tmp_path):
    from machined.apid.testing import Cluster, apid_nodes

    cluster = Cluster.create(tmp_path)
    assert pki.key_algorithm(cluster.ca.certificate) == "ECDSA secp256r1"
    async with apid_nodes(cluster, tmp_path, "e1", "e2") as (e1, e2):
        target = f"127.0.0.1:{e2.port}"
        # our dialer (Python ssl) and grpcio's own TLS client both reach apid
        async with channel(e1.port, cluster.ca.crt, cluster.client("os:reader")) as ch:
            v = await machine_pb2_grpc.MachineServiceStub(ch).Version(
                empty_pb2.Empty(), metadata=(("node", target),), timeout=10
            )
            assert [x.metadata.hostname for x in v.messages] == [target]
        async with cluster.channel(e1.port, cluster.client("os:reader")) as ch:
            v = await machine_pb2_grpc.MachineServiceStub(ch).Version(empty_pb2.Empty(), timeout=10)
            assert v.messages[0].metadata.hostname == "e1"
        ctx = tlsterm.client_context(cluster.ca.crt)
        _r, w = await asyncio.open_connection("127.0.0.1", e1.port, ssl=ctx, server_hostname="127.0.0.1")
        assert w.get_extra_info("ssl_object").version() in ("TLSv1.3", "TLSv1.2")
        assert isinstance(w.get_extra_info("ssl_object"), ssl.SSLObject)
        w.close()


def talos_secrets_bundle(ca: pki.KeyPair) -> str:
    """A secrets.yaml in ``talosctl gen secrets``'s layout: the OS CA Ed25519 under Talos's label, the
    etcd/Kubernetes CAs ECDSA under ``EC PRIVATE KEY`` (as Talos writes them), and the other sections."""
    from cryptography.hazmat.primitives.asymmetric import ec

    def ecdsa() -> dict[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        kp = pki.generate_ca("etcd", key=key)
        sec1 = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        assert b"BEGIN EC PRIVATE KEY" in sec1
        return {"crt": base64.b64encode(kp.crt).decode(), "key": base64.b64encode(sec1).decode()}

    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    bundle = {
        "cluster": {"id": b64(b"i" * 32), "secret": b64(b"s" * 32)},
        "secrets": {"bootstraptoken": "abcdef.0123456789abcdef", "secretboxencryptionsecret": b64(b"e" * 32)},
        "trustdinfo": {"token": TOKEN},
        "certs": {
            "etcd": ecdsa(),
            "k8s": ecdsa(),
            "k8saggregator": ecdsa(),
            "k8sserviceaccount": {"key": ecdsa()["key"]},
            "os": {"crt": b64(ca.crt), "key": b64(talos_label(ca.key))},
        },
    }
    return yaml.safe_dump(bundle)


async def test_gen_config_with_a_talos_secrets_bundle_works_end_to_end(tmp_path):
    """``spanctl gen config --with-secrets`` on a Talos secrets.yaml (Ed25519 OS CA): no warning, the
    configs carry the bundle's CA, and the generated talosconfig reaches an apid serving the generated
    controlplane.yaml."""
    import io

    from machined.spanctl import main as cli
    from machined.spanctl.client import Target
    from machined.spanctl.config import ClientConfig

    talos = TalosPki()
    bundle = tmp_path / "secrets.yaml"
    pki.write_secret_file(bundle, talos_secrets_bundle(talos.ca))
    port = free_port()
    out_dir = tmp_path / "out"
    out, err = io.StringIO(), io.StringIO()
    argv = [
        "gen",
        "config",
        "talos",
        "https://127.0.0.1:6443",
        "--with-secrets",
        str(bundle),
        "-o",
        str(out_dir),
    ]
    argv += ["--discovery", "https://d.invalid/", "-e", f"127.0.0.1:{port}"]
    assert await asyncio.to_thread(cli.main, argv, out, err) == 0, err.getvalue()
    assert "warning" not in err.getvalue()
    cp = yaml.safe_load_all((out_dir / "controlplane.yaml").read_text()).__next__()
    assert base64.b64decode(cp["machine"]["ca"]["crt"]) == talos.ca.crt
    assert b"ED25519 PRIVATE KEY" in base64.b64decode(cp["machine"]["ca"]["key"])
    assert cp["machine"]["token"] == TOKEN

    srv, sock = await start_machined("gen-1", tmp_path)
    procs = [
        spawn(tmp_path, "gen-1", "--config", str(out_dir / "controlplane.yaml"), "--machined-socket",
              str(sock), "--listen", f"127.0.0.1:{port}", "--trustd-listen", "off")
    ]  # fmt: skip
    try:
        await wait_serving(port, talos.ca.crt, talos.client("os:reader"), tmp_path / "gen-1.log")
        cfg = ClientConfig.parse((out_dir / "talosconfig").read_text())
        _name, ctx = cfg.current(None)
        assert pki.key_algorithm(pki.load_certificate(ctx.crt)) == "Ed25519"
        assert pki.roles_of(pki.load_certificate(ctx.crt)) == {"os:admin"}

        def call() -> str:
            t = Target.from_args(cfg)
            try:
                v = machine_pb2_grpc.MachineServiceStub(t.channel()).Version(empty_pb2.Empty(), timeout=10)
                return v.messages[0].metadata.hostname
            finally:
                t.close()

        assert await asyncio.to_thread(call) == "gen-1"
    finally:
        await asyncio.to_thread(stop_processes, procs)
        await srv.stop()


async def test_the_spanctl_command_with_a_talos_talosconfig(talos_nodes, tmp_path):
    """``spanctl --talosconfig FILE -n NODE version`` with Talos's Ed25519 PEMs (key under its label)."""
    import sys

    talos, ports = talos_nodes
    kp = talos.client("os:reader")
    assert b"ED25519 PRIVATE KEY" in kp.key
    tc = tmp_path / "talosconfig"
    ctx = {
        "endpoints": [f"127.0.0.1:{ports['front']}"],
        "ca": base64.b64encode(talos.ca.crt).decode(),
        "crt": base64.b64encode(kp.crt).decode(),
        "key": base64.b64encode(kp.key).decode(),
    }
    pki.write_secret_file(tc, yaml.safe_dump({"context": "talos", "contexts": {"talos": ctx}}))
    n1 = f"127.0.0.1:{ports['n1']}"
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "machined.spanctl.main", "--talosconfig", str(tc), "-n", n1, "version",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode == 0, err.decode()
    assert f"NODE:        {n1}" in out.decode()


async def test_the_dashboards_channel_with_a_talos_talosconfig(talos_nodes):
    """spanctl dashboard's asyncio channel (its collector's) from a Talos Ed25519 context."""
    from machined.spanctl.client import Target
    from machined.spanctl.config import ClientConfig
    from machined.spanctl.dashboard.collector import aio_channel

    talos, ports = talos_nodes
    kp = talos.client("os:reader")
    ctx = {
        "endpoints": [f"127.0.0.1:{ports['front']}"],
        "ca": base64.b64encode(talos.ca.crt).decode(),
        "crt": base64.b64encode(kp.crt).decode(),
        "key": base64.b64encode(kp.key).decode(),
    }
    cfg = ClientConfig.parse(yaml.safe_dump({"context": "talos", "contexts": {"talos": ctx}}))
    ch = aio_channel(Target.from_args(cfg))
    try:
        n2 = f"127.0.0.1:{ports['n2']}"
        v = await machine_pb2_grpc.MachineServiceStub(ch).Version(
            empty_pb2.Empty(), metadata=(("node", n2),), timeout=10
        )
        assert [x.metadata.hostname for x in v.messages] == [n2]
    finally:
        await ch.close()


async def test_a_dead_node_in_a_fan_out_is_named_with_the_reason(talos_nodes):
    talos, ports = talos_nodes
    n1, dead = f"127.0.0.1:{ports['n1']}", f"127.0.0.1:{free_port()}"
    async with channel(ports["front"], talos.ca.crt, talos.client("os:reader")) as ch:
        v = await machine_pb2_grpc.MachineServiceStub(ch).Version(
            empty_pb2.Empty(), metadata=(("nodes", f"{n1},{dead}"),), timeout=10
        )
    bad = [x.metadata for x in v.messages if x.metadata.error]
    assert [x.metadata.hostname for x in v.messages if not x.metadata.error] == [n1]
    assert len(bad) == 1 and bad[0].hostname == dead
    assert "unreachable" in bad[0].error and dead in bad[0].error
    assert "unix:" not in bad[0].error and "/tmp" not in bad[0].error, bad[0].error


async def test_ed25519_server_certificate_renewed_and_clients_still_verified(tmp_path):
    """After a renewal (new context from the next handshake on), client certificates are still
    required and verified: the admin gets in, another CA's client and a client without one do not."""
    from types import SimpleNamespace

    from machined.apid.testing import start_apid

    talos = TalosPki()
    cp, _ = talos.configs(tmp_path)
    srv, sock = await start_machined("r-1", tmp_path)
    apid = await start_apid(SimpleNamespace(config=cp), sock, "r-1", cert_ttl=dt.timedelta(seconds=6))
    task = asyncio.create_task(apid.renew_loop())
    try:
        first = apid.identity.server.crt
        async with asyncio.timeout(20):
            while apid.identity.server.crt == first:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        expiry = pki.load_certificate(first).not_valid_after_utc
        await asyncio.sleep(max(0.0, (expiry - dt.datetime.now(dt.UTC)).total_seconds()) + 0.5)
        async with channel(apid.port, talos.ca.crt, talos.client("os:admin")) as ch:  # new handshake
            v = await machine_pb2_grpc.MachineServiceStub(ch).Version(empty_pb2.Empty(), timeout=5)
            assert v.messages[0].metadata.hostname == "r-1"
        for kp in (TalosPki().client("os:admin"), None):
            async with channel(apid.port, talos.ca.crt, kp) as ch:
                got = await outcome(
                    machine_pb2_grpc.MachineServiceStub(ch).Version(empty_pb2.Empty(), timeout=5)
                )
            assert got == grpc.StatusCode.UNAVAILABLE, got
        assert pki.key_algorithm(apid.identity.server.certificate) == "Ed25519"
    finally:
        task.cancel()
        await apid.stop()
        await srv.stop()

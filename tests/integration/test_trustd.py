"""trustd on loopback: a control-plane apid process serves trustd, a worker apid process (worker
config: CA certificate, no key) obtains its server certificate from it and serves mTLS clients."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from machined import gen, pki
from machined.apid.testing import Cluster, apid_command, free_port, start_apid, start_machined, stop_processes
from machined.config import MachineConfig
from spanapi.talos.machine import machine_pb2_grpc
from spanapi.talos.security import security_pb2, security_pb2_grpc


def _worker_config(cluster: Cluster, tmp: Path) -> Path:
    path = tmp / "worker.yaml"
    pki.write_secret_file(
        path,
        gen.gen_config(
            "test", "https://127.0.0.1:6443", cluster.secrets, discovery=["https://discovery.invalid/"]
        ).worker,
    )
    v1 = MachineConfig.parse(path.read_bytes()).v1alpha1
    assert v1.ca is not None and v1.ca.key is None and v1.token
    return path


def _token(cluster: Cluster) -> str:
    token = MachineConfig.parse(cluster.config.read_bytes()).v1alpha1.token
    assert token
    return token


def _apid(tmp: Path, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*apid_command(), *args], stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "w")
    )


async def _certificate(port: int, ca: bytes, token: str, csr: bytes) -> security_pb2.CertificateResponse:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca)) as ch:
        stub = security_pb2_grpc.SecurityServiceStub(ch)
        return await stub.Certificate(
            security_pb2.CertificateRequest(csr=csr), metadata=[("token", token)], timeout=5
        )


async def test_worker_gets_its_certificate_from_trustd(tmp_path):
    cluster = Cluster.create(tmp_path)
    worker_cfg = _worker_config(cluster, tmp_path)
    cp_srv, cp_sock = await start_machined("cp-1", tmp_path / "cp")
    w_srv, w_sock = await start_machined("worker-1", tmp_path / "w")
    cp_port, trustd_port, w_port = free_port(), free_port(), free_port()
    procs = [
        _apid(tmp_path, "cp", "--config", str(cluster.config), "--machined-socket", str(cp_sock),
              "--listen", f"127.0.0.1:{cp_port}", "--trustd-listen", f"127.0.0.1:{trustd_port}",
              "--hostname", "cp-1", "--address", "127.0.0.1"),
    ]  # fmt: skip
    try:
        # trustd answers (its server certificate verified against the cluster CA)
        csr, _key = pki.server_csr(["127.0.0.1"], ["probe"])
        for _ in range(100):
            try:
                r = await _certificate(trustd_port, cluster.ca.crt, _token(cluster), csr)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "cp.log").read_text()[-2000:])
        assert r.ca == cluster.ca.crt
        pki.load_certificate(r.crt).verify_directly_issued_by(cluster.ca.certificate)

        # a wrong token is refused
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _certificate(trustd_port, cluster.ca.crt, "aaaaaa.bbbbbbbbbbbbbbbb", csr)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _certificate(trustd_port, cluster.ca.crt, "", csr)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

        procs.append(
            _apid(tmp_path, "worker", "--config", str(worker_cfg), "--machined-socket", str(w_sock),
                  "--listen", f"127.0.0.1:{w_port}", "--trustd-endpoint", f"127.0.0.1:{trustd_port}",
                  "--hostname", "worker-1", "--address", "127.0.0.1")
        )  # fmt: skip
        async with cluster.channel(w_port, cluster.client("os:reader")) as ch:
            m = machine_pb2_grpc.MachineServiceStub(ch)
            for _ in range(100):
                try:
                    v = await m.Version(empty_pb2.Empty(), timeout=2)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.2)
            else:
                raise AssertionError((tmp_path / "worker.log").read_text()[-2000:])
        assert v.messages[0].metadata.hostname == "worker-1"
        log = (tmp_path / "cp.log").read_text()
        assert "trustd issued certificate" in log
        assert _token(cluster) not in log
    finally:
        await asyncio.to_thread(stop_processes, procs)
        await cp_srv.stop()
        await w_srv.stop()


def test_worker_refuses_to_start_without_trustd(tmp_path):
    cluster = Cluster.create(tmp_path)
    worker_cfg = _worker_config(cluster, tmp_path)
    base = [*apid_command(), "--config", str(worker_cfg), "--machined-socket", str(tmp_path / "none.sock"),
            "--listen", "127.0.0.1:0"]  # fmt: skip
    p = subprocess.run(
        [*base, "--trustd-endpoint", f"127.0.0.1:{free_port()}", "--trustd-wait", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stderr
    assert "trustd" in p.stderr and "no server certificate" in p.stderr
    # no --trustd-endpoint and no machined to learn control-plane members from: gives up and says how
    p = subprocess.run([*base, "--trustd-wait", "1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "no key" in p.stderr and "--trustd-endpoint" in p.stderr and "discovery" in p.stderr


async def test_worker_renews_and_keeps_serving_when_trustd_is_gone(tmp_path):
    import datetime as dt

    cluster = Cluster.create(tmp_path)
    cp_srv, cp_sock = await start_machined("cp-1", tmp_path / "cp")
    w_srv, w_sock = await start_machined("worker-1", tmp_path / "w")
    cp = await start_apid(cluster, cp_sock, "cp-1", cert_ttl=dt.timedelta(seconds=10),
                          trustd_listen="127.0.0.1:0")  # fmt: skip
    worker = await start_apid(cluster, w_sock, "worker-1", config=_worker_config(cluster, tmp_path),
                              trustd_endpoint=[f"127.0.0.1:{cp.trustd_port}"])  # fmt: skip
    renew = asyncio.create_task(worker.renew_loop(poll=0.5))
    try:
        assert worker.worker and worker.identity is not None
        first = worker.identity.server.certificate
        assert first.not_valid_after_utc - first.not_valid_before_utc <= dt.timedelta(seconds=41)
        for _ in range(80):
            if worker.identity.generation > 1:
                break
            await asyncio.sleep(0.1)
        assert worker.identity.generation > 1, "worker did not renew at half-life"
        await cp.stop()  # trustd gone: renewal fails, the current certificate stays
        gen_now = worker.identity.generation
        await asyncio.sleep(2)  # several failed renewals (the 10 s certificate is still valid)
        assert worker.identity.generation == gen_now
        async with cluster.channel(worker.port, cluster.client("os:reader")) as ch:
            v = await machine_pb2_grpc.MachineServiceStub(ch).Version(empty_pb2.Empty(), timeout=5)
        assert v.messages[0].metadata.hostname == "worker-1"
    finally:
        renew.cancel()
        await worker.stop()
        await cp.stop()
        await cp_srv.stop()
        await w_srv.stop()


async def test_worker_finds_trustd_through_discovered_control_plane_members(tmp_path):
    """No --trustd-endpoint: the worker asks the control-plane Members machined knows (port 50001)."""
    from machined.apid.main import StartError, control_plane_endpoints
    from machined.apid.testing import start_fake_machined
    from machined.state import Resource
    from machined.state.catalog import MEMBER, NS_CLUSTER

    cluster = Cluster.create(tmp_path)
    cp_ip = f"127.0.{os.getpid() % 200 + 20}.{os.getpid() % 250 + 2}"
    cp_srv, cp_sock = await start_machined("cp-1", tmp_path / "cp")
    node, w_srv, w_sock = await start_fake_machined("worker-1", tmp_path / "w")
    members = {
        "cp-1": {"machineType": "controlplane", "addresses": ["fe80::1", "not-an-ip", cp_ip, cp_ip]},
        "worker-1": {"machineType": "worker", "addresses": ["127.0.0.99"]},
    }
    for mid, spec in members.items():
        await node.state.create(Resource.new(NS_CLUSTER, MEMBER, mid, spec), owner="test")
    assert await control_plane_endpoints(w_sock) == [cp_ip]
    assert await control_plane_endpoints(tmp_path / "no-such.sock", wait=0.5) == []
    try:
        cp = await start_apid(cluster, cp_sock, "cp-1", trustd_listen=f"{cp_ip}:50001", addresses=(cp_ip,))
    except (StartError, RuntimeError) as e:  # only a port clash with something else on this machine
        if "listen" in str(e) or "bind" in str(e).lower():
            pytest.skip(f"cannot listen on {cp_ip}:50001 (trustd's fixed port is taken): {e}")
        raise
    try:
        worker = await start_apid(
            cluster, w_sock, "worker-1", config=_worker_config(cluster, tmp_path), trustd_wait=20
        )
        try:
            assert worker.worker and worker.identity is not None
            crt = worker.identity.server.certificate
            crt.verify_directly_issued_by(pki.load_certificate(cluster.ca.crt))
            async with cluster.channel(worker.port, cluster.client("os:reader")) as ch:
                v = await machine_pb2_grpc.MachineServiceStub(ch).Version(empty_pb2.Empty(), timeout=5)
            assert v.messages[0].metadata.hostname == "worker-1"
        finally:
            await worker.stop()
    finally:
        await cp.stop()
        await cp_srv.stop()
        await w_srv.stop()

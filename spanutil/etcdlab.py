"""Test support: real etcd members (Debian's ``etcd-server``) for tests, benches and labs.

:class:`EtcdLab` starts 1, 3 or 5 members of one new cluster on free ports (loopback by default, or
one address per member, e.g. inside network namespaces when ``wrap`` prefixes the command with
``ip netns exec NS``), waits until every member reports healthy, and kills them all when closed.
Nothing here talks gRPC: health and status come from etcd's HTTP endpoints, so any layer may use it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

ETCD_BINARY = "etcd"
ETCD_BIN_ENV = "ETCD_BIN"  # another etcd binary to test with (e.g. a 3.5 or 3.6 build)


def etcd_binary() -> str | None:
    """The etcd server binary (``$ETCD_BIN``, else ``etcd`` on PATH or /usr/bin/etcd), or None when
    it is not installed."""
    override = os.environ.get(ETCD_BIN_ENV)
    candidates = [override] if override else [shutil.which(ETCD_BINARY), "/usr/bin/etcd"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A TCP port nothing listens on right now and not in ``taken`` (which it joins): the kernel may
    hand the same just-closed port out twice in a row, which once gave a member the same client and
    peer port. A small race with other processes remains."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if taken is None:
            return port
        if port not in taken:
            taken.add(port)
            return port


def _url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class EtcdTLS:
    """PEM files for TLS on etcd's client URLs: a CA, the members' server cert (valid for ``hosts``) and
    a client cert the members require. Make with :func:`make_tls`."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


def make_tls(directory: Path, hosts: Sequence[str] = ("127.0.0.1",)) -> EtcdTLS:
    """A throwaway CA and certs (EC P-256, one day) in ``directory``, for tests."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> tuple[Path, Path]:
        crt, pem = directory / f"{stem}.crt", directory / f"{stem}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            pem.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return crt, pem

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("etcdlab CA"))
        .issuer_name(name("etcdlab CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    ca_crt, _ = write("ca", ca, None)
    server_crt, server_key = write("server", *leaf("etcd", ExtendedKeyUsageOID.SERVER_AUTH, sans))
    client_crt, client_key = write("client", *leaf("registry", ExtendedKeyUsageOID.CLIENT_AUTH, []))
    return EtcdTLS(ca_crt, server_crt, server_key, client_crt, client_key)


@dataclass
class EtcdMember:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    tls: EtcdTLS | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def client_url(self) -> str:
        return _url(self.host, self.client_port, "https" if self.tls else "http")

    @property
    def peer_url(self) -> str:
        return _url(self.host, self.peer_port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 1.0) -> bool:
        """GET /health answers {"health": "true"} (the member has a leader and serves reads)."""
        try:
            with urllib.request.urlopen(
                self.client_url + "/health", timeout=timeout, context=self._ssl()
            ) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def status(self, timeout: float = 2.0) -> dict[str, object]:
        """Maintenance.Status through etcd's JSON gateway (numbers come as strings)."""
        req = urllib.request.Request(
            self.client_url + "/v3/maintenance/status",
            data=b"{}",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout, context=self._ssl()) as r:
            out: dict[str, object] = json.loads(r.read())
            return out

    def _ssl(self) -> ssl.SSLContext | None:
        return self.tls.context() if self.tls else None


class EtcdLab:
    """``size`` etcd members of one cluster. Use as a context manager (or call :meth:`start` and
    :meth:`close`); :meth:`close` always kills every member it started.

    ``hosts``: one listen address per member (default: 127.0.0.1 for all); ``wrap(member)``: a command
    prefix to run a member with (e.g. ``["ip", "netns", "exec", "ns1"]``); ``extra_args``: more etcd
    flags for every member; ``tls``: serve the client URLs over https, requiring client certs (peers stay
    plain)."""

    def __init__(
        self,
        root: Path,
        size: int = 1,
        *,
        hosts: Sequence[str] | None = None,
        wrap: Callable[[EtcdMember], list[str]] | None = None,
        extra_args: Sequence[str] = (),
        token: str = "spanlab",
        tls: EtcdTLS | None = None,
    ) -> None:
        binary = etcd_binary()
        if binary is None:
            raise FileNotFoundError("etcd is not installed (Debian: apt-get install etcd-server)")
        self.binary = binary
        hosts = list(hosts) if hosts is not None else ["127.0.0.1"] * size
        if len(hosts) != size:
            raise ValueError(f"{size} members need {size} hosts, not {len(hosts)}")
        self.root = root
        self.wrap = wrap
        self.extra_args = list(extra_args)
        self.token = token
        taken: set[int] = set()  # every port of this cluster distinct
        self.members = [
            EtcdMember(
                name=f"m{i}",
                host=h,
                client_port=free_port(h, taken) if wrap is None else 2379,
                peer_port=free_port(h, taken) if wrap is None else 2380,
                data_dir=root / f"m{i}.etcd",
                log_path=root / f"m{i}.log",
                tls=tls,
            )
            for i, h in enumerate(hosts)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def argv(self, m: EtcdMember, state: str = "new") -> list[str]:
        return [
            *(self.wrap(m) if self.wrap else []),
            self.binary,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={m.client_url}",
            f"--advertise-client-urls={m.client_url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            f"--initial-cluster-state={state}",
            f"--initial-cluster-token={self.token}",
            "--logger=zap",  # Debian's 3.4 needs it for some flags (lease checkpointing)
            "--log-outputs=stderr",
            *(
                [
                    f"--cert-file={m.tls.server_cert}",
                    f"--key-file={m.tls.server_key}",
                    f"--trusted-ca-file={m.tls.ca}",
                    "--client-cert-auth",
                ]
                if m.tls
                else []
            ),
            *self.extra_args,
        ]

    def _spawn(self, m: EtcdMember, state: str) -> None:
        m.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(m.log_path, "ab") as log:
            m.proc = subprocess.Popen(
                self.argv(m, state),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def start(self, timeout: float = 30.0) -> EtcdLab:
        """Start every member and wait until all are healthy."""
        try:
            for m in self.members:
                self._spawn(m, "new")
            self.wait_healthy(self.members, timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_healthy(self, members: Sequence[EtcdMember], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(members)
        while pending:
            for m in pending:
                if not m.running:
                    raise RuntimeError(
                        f"etcd {m.name} exited ({m.proc and m.proc.returncode}): {self.tail(m)}"
                    )
            pending = [m for m in pending if not m.healthy()]
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(m.name for m in pending)
                raise TimeoutError(f"etcd {names} not healthy within {timeout:g} s: {self.tail(pending[0])}")
            time.sleep(0.1)

    def tail(self, m: EtcdMember, lines: int = 5) -> str:
        try:
            return " | ".join(m.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def member(self, name_or_url: str) -> EtcdMember:
        for m in self.members:
            if name_or_url in (m.name, m.client_url):
                return m
        raise KeyError(name_or_url)

    def leader(self) -> EtcdMember:
        """The member the running members agree leads (by member ID from Status)."""
        for m in self.members:
            if not m.running:
                continue
            try:
                st = m.status()
            except OSError:
                continue
            header = st.get("header")
            if isinstance(header, dict) and str(header.get("member_id")) == str(st.get("leader")):
                return m
        raise RuntimeError("no etcd leader")

    def kill(self, m: EtcdMember, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL) and reap the member."""
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(sig)
            try:
                m.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()

    def restart(self, m: EtcdMember, timeout: float = 30.0) -> None:
        """Start a stopped member again on its data directory and wait until it is healthy."""
        self.kill(m)
        self._spawn(m, "existing")
        self.wait_healthy([m], timeout)

    def close(self) -> None:
        for m in self.members:
            self.kill(m)

    def __enter__(self) -> EtcdLab:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

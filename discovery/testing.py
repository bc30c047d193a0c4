"""Run a real ``discovery-service`` process on loopback (for tests, benchmarks and the demo).

``ServerProcess`` starts ``python -m discovery.server.main`` with ephemeral ports,
waits for its "serving" log line to learn them, and stops or kills it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self


def etcd_store_flags(endpoints: Sequence[str]) -> list[str]:
    """discovery-service flags that make it a replica on the etcd members at ``endpoints``."""
    return ["--store", "etcd", *(a for e in endpoints for a in ("--etcd-endpoint", e))]


class ServerProcess:
    def __init__(
        self,
        state_dir: Path | None,
        *args: str,
        rate_limit: float = 0,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.extra: Sequence[str] = args
        self.rate_limit = rate_limit
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    @property
    def snapshot_path(self) -> str:
        return str(self.state_dir / "state.binpb") if self.state_dir else ""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "discovery.server.main",
            "--addr",
            "127.0.0.1:0",
            "--landing-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--snapshot-path",
            self.snapshot_path,
            "--rate-limit",
            str(self.rate_limit),
        ]
        return cmd + list(self.extra)

    def start(self, timeout: float = 20.0) -> Self:
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="discovery-service-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=log, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.lines():
                if rec.get("msg") == "serving":
                    self.ports = {k: int(v) for k, v in rec["ports"].items()}
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        tail = "\n".join(json.dumps(r) for r in self.lines()[-20:])
        raise RuntimeError(f"discovery-service did not start (exit {self.proc.returncode}):\n{tail}")

    def lines(self) -> list[dict[str, Any]]:
        """The server's log so far, one dict per JSON line."""
        out: list[dict[str, Any]] = []
        if self.log_path is None or not self.log_path.exists():
            return out
        for line in self.log_path.read_bytes().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line.decode(errors="replace")})
        return out

    def rss_mib(self) -> float:
        """The server's resident set size in MiB (VmRSS)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for pid {self.proc.pid}")

    def http_get(self, port: str, path: str, timeout: float = 10.0) -> bytes:
        """GET ``path`` from the server's ``port`` ("landing" or "metrics") on loopback."""
        url = f"http://127.0.0.1:{self.ports[port]}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait (graceful: final snapshot)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: no chance to save anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()


def self_signed_cert(dns_name: str = "localhost", common_name: str | None = None) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 CA certificate for ``dns_name``: ``(cert_pem, key_pem)``, valid one day."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or dns_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem

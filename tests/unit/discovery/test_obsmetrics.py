"""The metrics alerts rely on: journal failures counted by operation, the serving certificate's
notAfter (re-read when the file changes), and the agent's discovery link."""

from __future__ import annotations

import datetime as dt
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from discovery.server import storage
from discovery.server.obsmetrics import CertificateExpiry, JournalFailures
from discovery.server.state import Registry
from discovery.server.storage import StorageUnavailable, Store
from kubespan.metrics import DiscoveryCollector


def test_journal_fsync_failures_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "state.binpb", heartbeat=0)
    store.load(Registry())
    reg = CollectorRegistry()
    JournalFailures(store, reg)
    assert reg.get_sample_value("discovery_storage_journal_failures_total", {"operation": "fsync"}) == 0
    store.record_update("c", "a", b"x", [], 600)

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(storage.os, "fsync", fsync)
    with pytest.raises(StorageUnavailable):
        store.sync()
    assert reg.get_sample_value("discovery_storage_journal_failures_total", {"operation": "fsync"}) == 1
    assert reg.get_sample_value("discovery_storage_journal_failures_total", {"operation": "write"}) == 0
    monkeypatch.undo()
    store.close()


def _cert(path: Path, days: int) -> dt.datetime:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registry")])
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return now + dt.timedelta(days=days)


def test_certificate_expiry_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tls.crt"
    reg = CollectorRegistry()
    CertificateExpiry(path, reg)
    name = "discovery_tls_certificate_expiry_timestamp_seconds"
    assert reg.get_sample_value(name) is None  # no file: no series (not a wrong value)
    first = _cert(path, 10)
    assert reg.get_sample_value(name) == first.timestamp()
    renewed = _cert(path, 90)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert reg.get_sample_value(name) == renewed.timestamp()
    path.write_text("not a certificate")
    assert reg.get_sample_value(name) is None


@dataclass
class _Endpoint:
    connected: bool
    affiliates: int


@dataclass
class _Stats:
    reconnects: int = 3


@dataclass
class _Client:
    eps: dict[str, _Endpoint] = field(default_factory=dict)
    stats: _Stats = field(default_factory=_Stats)

    def endpoint_status(self) -> dict[str, _Endpoint]:
        return self.eps


def test_discovery_collector_reports_each_endpoint() -> None:
    client = _Client({"https://a:3000": _Endpoint(True, 4), "https://b:3000": _Endpoint(False, 0)})
    current: list[_Client | None] = [None]
    reg = CollectorRegistry()
    DiscoveryCollector(lambda: current[0], reg)
    assert reg.get_sample_value("kubespan_discovery_connected", {"endpoint": "https://a:3000"}) is None
    current[0] = client
    assert reg.get_sample_value("kubespan_discovery_connected", {"endpoint": "https://a:3000"}) == 1
    assert reg.get_sample_value("kubespan_discovery_connected", {"endpoint": "https://b:3000"}) == 0
    assert reg.get_sample_value("kubespan_discovery_affiliates", {"endpoint": "https://a:3000"}) == 4
    assert reg.get_sample_value("kubespan_discovery_reconnects_total") == 3


def _signed(key, not_after: dt.datetime, version_v1: bool = False) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registry")])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(not_after)
    )
    if not version_v1:
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    "not_after",
    [
        dt.datetime(2027, 3, 4, 5, 6, 7, tzinfo=dt.UTC),  # UTCTime
        dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC),  # UTCTime, last year of it
        dt.datetime(2051, 1, 2, 3, 4, 5, tzinfo=dt.UTC),  # GeneralizedTime
    ],
)
@pytest.mark.parametrize("kind", ["ecdsa", "ed25519"])
def test_not_after_read_without_cryptography_agrees_with_it(kind: str, not_after: dt.datetime) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from discovery.server.obsmetrics import pem_not_after

    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ecdsa" else ed25519.Ed25519PrivateKey.generate()
    pem = _signed(key, not_after)
    expected = x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
    assert pem_not_after(pem) == expected == not_after.timestamp()
    # a key in front of the certificate, as in a combined file
    assert pem_not_after(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n" + pem) == expected


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nAgEB\n-----END CERTIFICATE-----\n",
    ],
)
def test_not_after_refuses_what_is_not_a_certificate(bad: bytes) -> None:
    from discovery.server.obsmetrics import pem_not_after

    with pytest.raises(ValueError):
        pem_not_after(bad)

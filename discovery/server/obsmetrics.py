"""Metrics that operators alert on and that no other part of the daemon exports:

- ``discovery_storage_journal_failures_total{operation="write"|"fsync"}``: every journal write or fsync
  that failed (the store counts them; ``discovery_storage_degraded`` only says "now").
- ``discovery_tls_certificate_expiry_timestamp_seconds``: the serving certificate's notAfter (unix time),
  read from the file at scrape time, so a renewed file shows at once; absent while it cannot be read.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from discovery.server.storage import Store


class JournalFailures:
    """Journal writes and fsyncs that failed, from :attr:`Store.failure_counts`."""

    def __init__(self, store: Store, registry: CollectorRegistry) -> None:
        self.store = store
        registry.register(self)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily(
            "discovery_storage_journal_failures",
            "Journal writes and fsyncs that failed (each one refuses updates until the journal works again).",
            labels=["operation"],
        )
        for what, n in sorted(self.store.failure_counts.items()):
            c.add_metric([what.removeprefix("journal ")], n)
        yield c


class CertificateExpiry:
    """The serving certificate's notAfter, re-read when the file changes."""

    def __init__(self, path: Path, registry: CollectorRegistry) -> None:
        self.path = path
        self._stamp: int | None = None
        self._not_after: float | None = None
        registry.register(self)

    def describe(self) -> list[Metric]:
        return []

    def not_after(self) -> float | None:
        """The first certificate's notAfter in the PEM file (unix time), or None if unreadable."""
        try:
            stamp = self.path.stat().st_mtime_ns
            if stamp != self._stamp:
                self._not_after = pem_not_after(self.path.read_bytes())
                self._stamp = stamp
        except (OSError, ValueError):
            self._stamp, self._not_after = None, None
        return self._not_after

    def collect(self) -> Iterator[Metric]:
        value = self.not_after()
        if value is None:
            return
        g = GaugeMetricFamily(
            "discovery_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the TLS certificate the gRPC port serves (unix time).",
        )
        g.add_metric([], value)
        yield g


# The registry image has no cryptography package: notAfter is read from the DER directly.
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)
_SEQUENCE, _UTC_TIME, _GENERALIZED_TIME, _VERSION_TAG = 0x30, 0x17, 0x18, 0xA0


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at ``at``."""
    if at + 2 > len(der):
        raise ValueError("truncated certificate")
    tag, n = der[at], der[at + 1]
    at += 2
    if n & 0x80:
        size = n & 0x7F
        if not 0 < size <= 4 or at + size > len(der):
            raise ValueError("bad DER length")
        n = int.from_bytes(der[at : at + size], "big")
        at += size
    if at + n > len(der):
        raise ValueError("truncated certificate")
    return tag, at, at + n


def pem_not_after(pem: bytes) -> float:
    """The first certificate's notAfter in ``pem`` (unix time); ValueError when it is not one.

    RFC 5280: Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter } ... } ... }."""
    m = _PEM.search(pem)
    if m is None:
        raise ValueError("no PEM certificate")
    try:
        der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
    except binascii.Error as e:
        raise ValueError(f"bad PEM: {e}") from None
    tag, at, _ = _tlv(der, 0)
    tag2, at, _ = _tlv(der, at)  # tbsCertificate
    if tag != _SEQUENCE or tag2 != _SEQUENCE:
        raise ValueError("not a certificate")
    tag, start, end = _tlv(der, at)
    if tag == _VERSION_TAG:
        tag, start, end = _tlv(der, end)
    for _ in range(3):  # after serialNumber: signature, issuer, validity
        tag, start, end = _tlv(der, end)
    if tag != _SEQUENCE:
        raise ValueError("no validity")
    _, _, nb_end = _tlv(der, start)  # notBefore
    tag, start, end = _tlv(der, nb_end)  # notAfter
    text = der[start:end].decode("ascii")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; RFC 5280: YY >= 50 is 19YY
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME:
        raise ValueError("bad notAfter")
    t = dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)
    return t.timestamp()

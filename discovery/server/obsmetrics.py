"""Metrics that operators alert on and that no other part of the daemon exports:

- ``discovery_storage_journal_failures_total{operation="write"|"fsync"}``: every journal write or fsync
  that failed (the store counts them; ``discovery_storage_degraded`` only says "now").
- ``discovery_tls_certificate_expiry_timestamp_seconds``: the serving certificate's notAfter (unix time),
  read from the file at scrape time, so a renewed file shows at once; absent while it cannot be read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
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
                cert = x509.load_pem_x509_certificate(self.path.read_bytes())
                self._not_after = cert.not_valid_after_utc.timestamp()
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

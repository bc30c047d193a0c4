"""apid's certificates: the node's server certificate and its ``os:impersonator`` client certificate,
both issued from the cluster CA held in the machine config (control-plane nodes), short-lived and
re-issued at half-life. The server side uses grpc's dynamic server credentials: each new TLS
handshake asks :meth:`Identity._fetch`, which hands over the new certificate once after a renewal,
so renewal needs no restart and live connections are not dropped.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterable

import grpc

from machined import pki

SansProvider = Callable[[], Iterable[str]]


class Identity:
    """CA + current server and node-client certificates of this apid."""

    def __init__(
        self,
        ca: pki.KeyPair,
        hostname: str,
        addresses: Iterable[str] = (),
        *,
        server_ttl: dt.timedelta = pki.SERVER_TTL,
        client_ttl: dt.timedelta = pki.NODE_CLIENT_TTL,
    ) -> None:
        pki.check_tls_usable(ca.crt, ca.key)  # Ed25519: refuse with the reason and the fix
        self.ca = ca
        self.hostname = hostname
        self.server_ttl = server_ttl
        self.client_ttl = client_ttl
        self._lock = threading.Lock()
        self._addresses = list(addresses)
        self.generation = 0
        self._fetched = -1
        self.server: pki.KeyPair
        self.client: pki.KeyPair
        self._issue(self._addresses)

    def _issue(self, addresses: Iterable[str]) -> None:
        server = pki.issue_server(self.ca, addresses, [self.hostname], self.server_ttl)
        client = pki.issue_client(self.ca, ["os:impersonator"], self.client_ttl, common_name=self.hostname)
        with self._lock:
            self._addresses = list(addresses)
            self.server, self.client = server, client
            self.generation += 1

    @property
    def addresses(self) -> list[str]:
        return list(self._addresses)

    def needs_renewal(self, now: dt.datetime | None = None) -> bool:
        return pki.needs_renewal(self.server.crt, now) or pki.needs_renewal(self.client.crt, now)

    def next_renewal(self) -> dt.datetime:
        return min(pki.renewal_time(self.server.crt), pki.renewal_time(self.client.crt))

    def renew(self, addresses: Iterable[str] | None = None) -> None:
        self._issue(self._addresses if addresses is None else addresses)

    # -- grpc credentials ---------------------------------------------------------------------------

    def _config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.server.key, self.server.crt)], self.ca.crt)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if self._fetched == self.generation:
                return None
            self._fetched = self.generation
            return self._config()

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS (grpc core: ≥ 1.2) with required client certificates verified against the cluster CA."""
        with self._lock:
            self._fetched = self.generation
            initial = self._config()
        return grpc.dynamic_ssl_server_credentials(initial, self._fetch, require_client_authentication=True)

    def client_credentials(self) -> grpc.ChannelCredentials:
        """For forwarding to another node's apid: our ``os:impersonator`` certificate, CA-verified server."""
        return grpc.ssl_channel_credentials(self.ca.crt, self.client.key, self.client.crt)

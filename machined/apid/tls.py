"""apid's certificates: the node's server certificate and its ``os:impersonator`` client certificate,
both issued from the cluster CA held in the machine config (control-plane nodes), short-lived and
re-issued at half-life. TLS is Python's ``ssl`` (:mod:`.tlsterm`); :meth:`Identity.server_context`
and :meth:`Identity.client_context` build an :class:`ssl.SSLContext` per certificate generation, and
the terminator switches new handshakes to the current one, so renewal needs no restart and live
connections are not dropped. ECDSA and Ed25519 CAs alike (Talos's default is Ed25519).
"""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from machined import pki, tlsterm

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
        pki.check_tls_usable(ca.crt, ca.key)  # a key that is not the certificate's: refuse
        self.ca = ca
        self.hostname = hostname
        self.server_ttl = server_ttl
        self.client_ttl = client_ttl
        self._lock = threading.Lock()
        self._addresses = list(addresses)
        self.generation = 0
        self._contexts: dict[tuple[str, bool], tuple[int, ssl.SSLContext]] = {}
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

    # -- TLS contexts (Python ssl) ------------------------------------------------------------------

    def _cached(self, kind: str, flag: bool, make: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        with self._lock:
            gen = self.generation
            hit = self._contexts.get((kind, flag))
        if hit is not None and hit[0] == gen:
            return hit[1]
        ctx = make()
        with self._lock:
            self._contexts[(kind, flag)] = (gen, ctx)
        return ctx

    def server_context(self, workdir: Path, *, require_client: bool = True) -> ssl.SSLContext:
        """TLS ≥ 1.2 with the current server certificate; ``require_client``: a client certificate
        is required and verified against the cluster CA (apid), else none is asked for (trustd)."""
        with self._lock:
            server = self.server
        ca = self.ca.crt if require_client else None
        return self._cached(
            "server", require_client, lambda: tlsterm.server_context(server.crt, server.key, workdir, ca=ca)
        )

    def client_context(self, workdir: Path) -> ssl.SSLContext:
        """For forwarding to another node's apid: our ``os:impersonator`` certificate; the server is
        verified against the cluster CA and the name or address dialed."""
        with self._lock:
            client = self.client
        return self._cached(
            "client", True, lambda: tlsterm.client_context(self.ca.crt, workdir, client.crt, client.key)
        )

"""The trustd role (Talos's ``securityapi.SecurityService/Certificate``).

Control-plane nodes (holding the CA key) serve it on TCP 50001 over TLS (no client certificate;
Python ssl through :mod:`.tlsterm`, so Ed25519 and ECDSA alike): a node sends a CSR (ECDSA P-256 or
Ed25519, as Talos workers send for an Ed25519 CA) with the machine token in the ``token`` metadata and
gets back a short-lived server certificate signed by the cluster CA (see
:func:`machined.pki.sign_server_csr` for what is refused). Workers (CA certificate, no key) use
:class:`WorkerIdentity` to obtain and renew theirs.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grpc

from machined import pki, tlsterm
from spanapi.talos.security import security_pb2, security_pb2_grpc
from spanutil.logs import log_event

from .tls import Identity

log = logging.getLogger("apid.trustd")

TRUSTD_PORT = 50001
REQUEST_TIMEOUT = 10.0  # seconds per trustd call


class TrustdError(RuntimeError):
    """No trustd endpoint issued a certificate; the message lists why, per endpoint."""


def token_ok(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison; no token configured → nothing matches."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


class SecurityService(security_pb2_grpc.SecurityServiceServicer):
    """Signs CSRs with the cluster CA for callers presenting the machine token."""

    def __init__(
        self,
        ca: pki.KeyPair,
        token: str | None,
        ttl: dt.timedelta = pki.SERVER_TTL,
        peers: tlsterm.PeerRegistry | None = None,
    ) -> None:
        self.ca = ca
        self._token = token
        self.ttl = ttl
        self.peers = peers

    def _peer(self, context: grpc.aio.ServicerContext) -> str:
        """The TCP peer the terminator saw (grpc itself sees the private unix socket)."""
        peer = context.peer()
        info = self.peers.lookup(peer) if self.peers is not None else None
        return info.tcp_peer if info is not None else peer

    async def Certificate(
        self, request: security_pb2.CertificateRequest, context: grpc.aio.ServicerContext
    ) -> security_pb2.CertificateResponse:
        if self.peers is not None and self.peers.lookup(context.peer()) is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not through the TLS listener")
        given = next((v for k, v in context.invocation_metadata() or () if k == "token"), None)
        if isinstance(given, bytes):
            given = given.decode(errors="replace")
        if not token_ok(given, self._token):
            log_event(log, "trustd refused", logging.WARNING, peer=self._peer(context), reason="bad token")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid machine token")
        try:
            crt, sans = pki.sign_server_csr(self.ca, request.csr, self.ttl)
        except pki.PKIError as e:
            log_event(log, "trustd refused", logging.WARNING, peer=self._peer(context), reason=str(e))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        c = pki.load_certificate(crt)
        log_event(
            log,
            "trustd issued certificate",
            peer=self._peer(context),
            subject=c.subject.rfc4514_string(),
            sans=sans,
            expires_at=c.not_valid_after_utc.isoformat(),
        )
        return security_pb2.CertificateResponse(ca=self.ca.crt, crt=crt)


def endpoint_target(value: str) -> str:
    """``host`` → ``host:50001``; ``host:port`` and ``[v6]:port`` kept; a bare IPv6 gets brackets."""
    if value.startswith("["):
        return value if "]:" in value else f"{value}:{TRUSTD_PORT}"
    if value.count(":") == 1:
        return value
    if value.count(":") > 1:
        return f"[{value}]:{TRUSTD_PORT}"
    return f"{value}:{TRUSTD_PORT}"


def request_certificate(
    ca_crt: bytes,
    token: str,
    endpoints: Sequence[str],
    addresses: Iterable[str],
    hostname: str,
    *,
    timeout: float = REQUEST_TIMEOUT,
) -> pki.KeyPair:
    """Ask each endpoint in turn for a server certificate; the first valid answer wins.

    trustd's own certificate is verified against the cluster CA and the endpoint's name or address
    (Python ssl, :class:`tlsterm.ThreadDialer`), and the returned certificate must be signed by that
    CA and carry our public key.
    """
    csr, key = pki.server_csr(addresses, [hostname], ca_crt=ca_crt)  # key of the CA's kind, as Talos
    ca = pki.load_certificate(ca_crt)
    our_pub = pki.load_private_key(key).public_key()  # type: ignore[attr-defined]
    errors = []
    ctx = tlsterm.client_context(ca_crt)
    for ep in endpoints:
        target = endpoint_target(ep)
        dialer: tlsterm.ThreadDialer | None = None
        try:
            dialer = tlsterm.ThreadDialer(target, ctx)
            opts = [("grpc.default_authority", target)]
            with grpc.insecure_channel(dialer.grpc_target, options=opts) as ch:
                stub = security_pb2_grpc.SecurityServiceStub(ch)
                r = stub.Certificate(
                    security_pb2.CertificateRequest(csr=csr), metadata=[("token", token)], timeout=timeout
                )
            crt = pki.load_certificate(r.crt)
            crt.verify_directly_issued_by(ca)
            if crt.public_key() != our_pub:
                raise pki.PKIError("certificate is not for our key")
            return pki.KeyPair(r.crt, key)
        except grpc.RpcError as e:
            why = dialer.last_error if dialer is not None else None
            code = e.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAVAILABLE and why:
                errors.append(f"{target}: UNAVAILABLE {why}")
            else:
                errors.append(f"{target}: {code.name} {e.details()}")  # type: ignore[attr-defined]
        except (ValueError, TypeError, pki.PKIError) as e:
            errors.append(f"{target}: bad certificate: {e}")
        except (OSError, tlsterm.TlsSetupError) as e:
            errors.append(f"{target}: {e}")
        finally:
            if dialer is not None:
                dialer.close()
    raise TrustdError("; ".join(errors) or "no trustd endpoint")


class WorkerIdentity(Identity):
    """A worker's apid identity: the server certificate comes from trustd; no client certificate
    (so no forwarding to other nodes)."""

    def __init__(
        self,
        ca_crt: bytes,
        hostname: str,
        addresses: Iterable[str],
        token: str,
        endpoints: Sequence[str],
        *,
        requester: Callable[..., pki.KeyPair] = request_certificate,
    ) -> None:
        self.ca = pki.KeyPair(ca_crt, b"")
        self.hostname = hostname
        self.token = token
        self.endpoints = list(endpoints)
        self._requester = requester
        self._lock = threading.Lock()
        self._addresses = list(addresses)
        self.generation = 0
        self._contexts: dict[tuple[str, bool], tuple[int, ssl.SSLContext]] = {}
        self._issue(self._addresses)

    def _issue(self, addresses: Iterable[str]) -> None:
        addresses = list(addresses)
        server = self._requester(self.ca.crt, self.token, self.endpoints, addresses, self.hostname)
        with self._lock:
            self._addresses = addresses
            self.server = server
            self.generation += 1

    def needs_renewal(self, now: dt.datetime | None = None) -> bool:
        return pki.needs_renewal(self.server.crt, now)

    def next_renewal(self) -> dt.datetime:
        return pki.renewal_time(self.server.crt)

    def client_context(self, workdir: Path) -> ssl.SSLContext:
        raise RuntimeError("a worker holds no client certificate")

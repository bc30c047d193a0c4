"""Client certificates for ``GenerateClientConfiguration``: signed by the machine CA (``machine.ca``),
roles in the subject's Organization, keys of the CA's type (ECDSA P-256, or Ed25519 for Talos's Ed25519 CA).
Only a node that holds the CA key (control plane) can issue them. The certificate itself and the
talosconfig come from :mod:`machined.pki` and :mod:`machined.gen`; this module adds the API's limits."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from machined import gen, pki

DEFAULT_TTL = dt.timedelta(days=365)  # talosctl's default for admin certificates
MAX_TTL = dt.timedelta(days=3650)
COMMON_NAME = "machined-client"


class CertError(ValueError):
    """The request asked for something the API does not issue (the message names the field)."""


def issue_client_certificate(
    ca_crt_pem: bytes, ca_key_pem: bytes, roles: Sequence[str], ttl: dt.timedelta = DEFAULT_TTL
) -> tuple[bytes, bytes]:
    """``(crt_pem, key_pem)`` of a new client certificate carrying ``roles``; an unusable CA raises
    :class:`machined.pki.PKIError` (a ``ValueError``)."""
    if ttl <= dt.timedelta(0) or ttl > MAX_TTL:
        raise CertError(f"crt_ttl must be within (0, {MAX_TTL.days} days], got {ttl}")
    kp = pki.issue_client(pki.KeyPair(ca_crt_pem, ca_key_pem), list(roles), ttl, common_name=COMMON_NAME)
    return kp.crt, kp.key


def talosconfig(context: str, ca: bytes, crt: bytes, key: bytes, endpoints: Sequence[str] = ()) -> bytes:
    """A talosconfig with one context (``ca``/``crt``/``key`` are base64 of the PEM, as talosctl writes)."""
    return gen.talosconfig(context, ca, pki.KeyPair(crt, key), endpoints).encode()

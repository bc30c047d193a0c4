"""Client certificates for ``GenerateClientConfiguration``: signed by the machine CA (``machine.ca``),
roles in the subject's Organization, ECDSA P-256 keys (grpcio cannot do Ed25519, see machined.md §0).
Only a node that holds the CA key (control plane) can issue them."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TTL = dt.timedelta(days=365)  # talosctl's default for admin certificates
MAX_TTL = dt.timedelta(days=3650)


class CertError(ValueError):
    pass


def issue_client_certificate(
    ca_crt_pem: bytes, ca_key_pem: bytes, roles: Sequence[str], ttl: dt.timedelta = DEFAULT_TTL
) -> tuple[bytes, bytes]:
    """``(crt_pem, key_pem)`` of a new client certificate carrying ``roles``."""
    if ttl <= dt.timedelta(0) or ttl > MAX_TTL:
        raise CertError(f"crt_ttl must be within (0, {MAX_TTL.days} days], got {ttl}")
    ca_crt = x509.load_pem_x509_certificate(ca_crt_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, r) for r in roles]
        + [x509.NameAttribute(NameOID.COMMON_NAME, "machined-client")]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_crt.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=10))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    algorithm = (
        None if isinstance(ca_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
    )
    crt = builder.sign(ca_key, algorithm)  # type: ignore[arg-type]
    return (
        crt.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def talosconfig(context: str, ca: bytes, crt: bytes, key: bytes, endpoints: Sequence[str] = ()) -> bytes:
    """A talosconfig with one context (``ca``/``crt``/``key`` are base64 of the PEM, as talosctl writes)."""
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    doc = {
        "context": context,
        "contexts": {
            context: {
                "endpoints": list(endpoints),
                "nodes": [],
                "ca": b64(ca),
                "crt": b64(crt),
                "key": b64(key),
            }
        },
    }
    return yaml.safe_dump(doc, sort_keys=False).encode()

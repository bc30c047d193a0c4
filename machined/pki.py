"""Certificates for the OS API: the cluster CA, client and server certificates, renewal, key files.

Key types follow the CA, as Talos's ``NewKeyPair``: an **ECDSA** CA (ours, from ``spanctl gen
secrets``) gets ECDSA P-256 leaves signed with SHA-256, an **Ed25519** CA (Talos's default) gets
Ed25519 leaves. Both work end to end because apid and spanctl do TLS with Python's ``ssl`` on
OpenSSL (:mod:`machined.apid.tlsterm`), not grpcio's TLS, which offers no Ed25519 (grpc/grpc#24252).
Talos writes Ed25519 keys under the PEM label ``ED25519 PRIVATE KEY`` (PKCS#8 inside);
:func:`load_private_key` and :func:`normalize_key_pem` accept it.

* CA: self-signed, ``O=talos`` (as Talos), valid 10 years, ``BasicConstraints(ca=True)``.
* Client certificates: ``O=<role>`` for each role (``os:admin``, ``os:reader``…), EKU exactly
  ``[clientAuth]`` (apid checks it, as Talos's ``apidCheckExtKeyUsage``), default TTL 1 year.
* Server certificates: SANs = addresses (IP SANs, including the mesh address) and hostnames (DNS
  SANs), EKU ``[serverAuth]``, short-lived (24 h by default) and renewed at half-life
  (:func:`needs_renewal`).

Pure functions over PEM bytes, plus :func:`write_secret_file` (atomic, 0600).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spanutil import fsutil

CA_TTL = dt.timedelta(hours=87600)  # as Talos's OS CA
CLIENT_TTL = dt.timedelta(days=365)  # as talosctl's admin certificate
SERVER_TTL = dt.timedelta(hours=24)  # as Talos's apid server certificate
NODE_CLIENT_TTL = dt.timedelta(hours=24)  # os:impersonator certificate for node-to-node forwarding
CA_ORGANIZATION = "talos"
BACKDATE = dt.timedelta(seconds=30)  # tolerate small clock skew between nodes

_LABEL = re.compile(rb"-----(BEGIN|END) ([A-Z0-9]+ )?PRIVATE KEY-----")


class PKIError(ValueError):
    """A certificate or key that cannot be used; the message says why (never contains key material)."""


class UnsupportedKeyError(PKIError):
    """A CA key type we cannot issue with or use in TLS (anything but ECDSA and Ed25519)."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A PEM certificate and its PEM private key (PKCS#8, unencrypted)."""

    crt: bytes
    key: bytes = field(repr=False)

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.crt)


# --- keys ------------------------------------------------------------------------------------------


LeafKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _new_key_like(ca: object) -> LeafKey:
    """A leaf key of the CA's kind (Talos's ``NewKeyPair``): Ed25519 for an Ed25519 CA, else ECDSA
    P-256. ``ca`` is the CA's certificate or key."""
    if key_algorithm(ca) == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return _new_key()


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def normalize_key_pem(pem: bytes) -> bytes:
    """A private key PEM OpenSSL and ``cryptography`` read: Talos's ``ED25519 PRIVATE KEY`` (and any
    ``<ALG> PRIVATE KEY`` label holding PKCS#8) becomes ``PRIVATE KEY``; SEC1 ``EC PRIVATE KEY`` and
    PKCS#1 ``RSA PRIVATE KEY`` are kept."""
    m = _LABEL.search(pem)
    if m is None or m.group(2) in (None, b"EC ", b"RSA ", b"ENCRYPTED "):
        return pem
    return _LABEL.sub(lambda x: b"-----" + x.group(1) + b" PRIVATE KEY-----", pem)


def load_private_key(pem: bytes) -> object:
    try:
        return serialization.load_pem_private_key(normalize_key_pem(pem), password=None)
    except (ValueError, TypeError) as e:
        raise PKIError(f"not a usable unencrypted PEM private key ({type(e).__name__})") from None


def load_certificate(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise PKIError("not a PEM certificate") from None


def key_algorithm(obj: object) -> str:
    """A short name for a key's (or certificate's public key's) algorithm."""
    if isinstance(obj, x509.Certificate):
        obj = obj.public_key()
    if isinstance(obj, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(obj, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(obj, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"ECDSA {obj.curve.name}"
    return type(obj).__name__


def check_tls_usable(ca_crt: bytes, ca_key: bytes | None = None) -> None:
    """Raise :class:`PKIError` when the CA cannot serve: not a certificate, an unreadable key, a key
    that is not the certificate's, or (:class:`UnsupportedKeyError`) a type other than ECDSA or
    Ed25519 (Talos's default, fine since TLS goes through OpenSSL)."""
    cert = load_certificate(ca_crt)
    alg = key_algorithm(cert)
    if alg != "Ed25519" and not alg.startswith("ECDSA"):
        raise UnsupportedKeyError(f"the cluster CA (machine.ca) is {alg}: use an ECDSA or Ed25519 CA")
    if ca_key is None:
        return
    key = load_private_key(ca_key)
    pub = key.public_key()  # type: ignore[attr-defined]
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if pub.public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        raise PKIError("machine.ca.key is not the key of machine.ca.crt")


def _signing_hash(ca_key: object) -> hashes.HashAlgorithm | None:
    if isinstance(ca_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


# --- issuing ---------------------------------------------------------------------------------------


def generate_ca(
    organization: str = CA_ORGANIZATION,
    ttl: dt.timedelta = CA_TTL,
    *,
    now: dt.datetime | None = None,
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | None = None,
) -> KeyPair:
    """A new self-signed CA, ECDSA P-256 unless ``key`` is given (an Ed25519 key makes a CA as Talos
    generates it by default; its leaves are then Ed25519 too)."""
    key = key or _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])
    t = _now(now)
    crt = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - BACKDATE)
        .not_valid_after(t + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _signing_hash(key))
    )
    return KeyPair(crt.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _leaf(
    ca: KeyPair,
    subject: x509.Name,
    eku: Sequence[x509.ObjectIdentifier],
    ttl: dt.timedelta,
    now: dt.datetime | None,
    sans: Sequence[x509.GeneralName] = (),
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | None = None,
) -> KeyPair:
    """A CA-signed leaf; with ``public_key`` (a CSR's) the returned key is empty."""
    if ttl <= dt.timedelta(0):
        raise PKIError(f"certificate TTL must be positive, got {ttl}")
    ca_crt = load_certificate(ca.crt)
    ca_key = load_private_key(ca.key)
    key = _new_key_like(ca_crt) if public_key is None else None
    t = _now(now)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_crt.subject)
        .public_key(key.public_key() if key is not None else public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - BACKDATE)
        .not_valid_after(t + ttl)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    crt = b.sign(ca_key, _signing_hash(ca_key))  # type: ignore[arg-type]
    return KeyPair(crt.public_bytes(serialization.Encoding.PEM), _key_pem(key) if key is not None else b"")


def issue_client(
    ca: KeyPair,
    roles: Sequence[str],
    ttl: dt.timedelta = CLIENT_TTL,
    *,
    common_name: str = "spanctl",
    now: dt.datetime | None = None,
) -> KeyPair:
    """A client certificate with one ``O=`` per role and EKU ``[clientAuth]``."""
    if not roles:
        raise PKIError("a client certificate needs at least one role")
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, r) for r in roles]
        + [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )
    return _leaf(ca, subject, [ExtendedKeyUsageOID.CLIENT_AUTH], ttl, now)


def server_sans(addresses: Iterable[str], hostnames: Iterable[str] = ()) -> list[x509.GeneralName]:
    """IP SANs for addresses (IPv4/IPv6, e.g. the node and mesh addresses) and DNS SANs for the rest."""
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for a in [*addresses, *hostnames]:
        a = a.strip()
        if not a or a in seen:
            continue
        seen.add(a)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(a)))
        except ValueError:
            out.append(x509.DNSName(a))
    return out


def issue_server(
    ca: KeyPair,
    addresses: Iterable[str],
    hostnames: Iterable[str] = (),
    ttl: dt.timedelta = SERVER_TTL,
    *,
    now: dt.datetime | None = None,
) -> KeyPair:
    """A short-lived server certificate for a node (EKU ``[serverAuth]``)."""
    hostnames = list(hostnames)
    sans = server_sans(addresses, hostnames)
    if not sans:
        raise PKIError("a server certificate needs at least one address or hostname")
    cn = hostnames[0] if hostnames else "apid"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return _leaf(ca, subject, [ExtendedKeyUsageOID.SERVER_AUTH], ttl, now, sans)


def server_csr(
    addresses: Iterable[str], hostnames: Iterable[str] = (), *, ca_crt: bytes | None = None
) -> tuple[bytes, bytes]:
    """A new key and a CSR for a server certificate with those SANs: (csr PEM, key PEM). The key is
    of the CA's kind when ``ca_crt`` is given (Ed25519 for an Ed25519 CA, as a Talos worker's CSR),
    else ECDSA P-256."""
    hostnames = list(hostnames)
    sans = server_sans(addresses, hostnames)
    if not sans:
        raise PKIError("a server certificate needs at least one address or hostname")
    key = _new_key_like(load_certificate(ca_crt)) if ca_crt is not None else _new_key()
    cn = hostnames[0] if hostnames else "apid"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, _signing_hash(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def sign_server_csr(
    ca: KeyPair, csr_pem: bytes, ttl: dt.timedelta = SERVER_TTL, *, now: dt.datetime | None = None
) -> tuple[bytes, list[str]]:
    """Sign a node's CSR (Talos's trustd): (certificate PEM, the SANs granted).

    Refused (:class:`PKIError`): not a PEM CSR, a bad signature, a key other than ECDSA P-256 or
    Ed25519 (what Talos workers send for an Ed25519 CA), a request for ``CA:true``. Only IP and DNS SANs are kept, and only ``CN`` of the subject (never
    ``O=``: no roles). The certificate is a leaf (``CA:false``) with EKU serverAuth + clientAuth.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise PKIError("not a PEM certificate signing request") from None
    pub = csr.public_key()
    p256 = isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1)
    if not p256 and not isinstance(pub, ed25519.Ed25519PublicKey):
        raise PKIError(f"CSR key must be ECDSA P-256 or Ed25519, got {key_algorithm(pub)}")
    if not csr.is_signature_valid:
        raise PKIError("CSR signature is invalid")
    try:
        bc = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        raise PKIError("CSR asks for a CA certificate (CA:true): refused")
    try:
        requested = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        requested = []
    sans: list[x509.GeneralName] = [g for g in requested if isinstance(g, x509.IPAddress | x509.DNSName)]
    if not sans:
        raise PKIError("CSR has no IP or DNS subject alternative name")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns and cns[0].value else "apid"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    kp = _leaf(ca, subject, eku, ttl, now, sans, public_key=pub)
    return kp.crt, [str(g.value) for g in sans]


# --- inspection ------------------------------------------------------------------------------------


def roles_of(cert: x509.Certificate) -> frozenset[str]:
    """Every ``O=`` value of the subject, as written: each is one role (never split; see
    :func:`machined.api.roles.parse_roles`, which apid applies to these)."""
    return frozenset(
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) if a.value
    )


def ext_key_usage(cert: x509.Certificate) -> tuple[x509.ObjectIdentifier, ...]:
    try:
        return tuple(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return ()


def is_client_cert(cert: x509.Certificate) -> bool:
    """EKU exactly ``[clientAuth]`` (Talos's ``verifyExtKeyUsage``)."""
    return ext_key_usage(cert) == (ExtendedKeyUsageOID.CLIENT_AUTH,)


def needs_renewal(cert: x509.Certificate | bytes, now: dt.datetime | None = None) -> bool:
    """True once half of the certificate's lifetime has passed (or it is not valid yet/any more)."""
    if isinstance(cert, bytes):
        cert = load_certificate(cert)
    t = _now(now)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return not start <= t < start + (end - start) / 2


def renewal_time(cert: x509.Certificate | bytes) -> dt.datetime:
    """When :func:`needs_renewal` turns true."""
    if isinstance(cert, bytes):
        cert = load_certificate(cert)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) / 2


# --- files -----------------------------------------------------------------------------------------


def write_secret_file(path: Path | str, data: bytes | str, mode: int = 0o600) -> None:
    """Write atomically, born with ``mode`` (0600): no moment where the secret is readable by others."""
    fsutil.write_atomic(path, data, mode)

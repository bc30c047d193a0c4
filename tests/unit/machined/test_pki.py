import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from machined import pki
from machined.apid.testing import ed25519_ca


def test_ca_is_ecdsa_p256_self_signed_ca():
    ca = pki.generate_ca()
    c = ca.certificate
    assert isinstance(c.public_key(), ec.EllipticCurvePublicKey)
    assert c.public_key().curve.name == "secp256r1"
    assert isinstance(c.signature_hash_algorithm, hashes.SHA256)
    assert c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert c.issuer == c.subject
    c.verify_directly_issued_by(c)
    assert pki.key_algorithm(pki.load_private_key(ca.key)) == "ECDSA secp256r1"
    pki.check_tls_usable(ca.crt, ca.key)


def test_client_cert_roles_and_eku():
    ca = pki.generate_ca()
    kp = pki.issue_client(ca, ["os:reader", "os:operator"])
    c = kp.certificate
    c.verify_directly_issued_by(ca.certificate)
    assert pki.roles_of(c) == {"os:reader", "os:operator"}
    assert pki.is_client_cert(c)
    assert not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(pki.PKIError):
        pki.issue_client(ca, [])


def test_server_cert_sans_and_not_client():
    ca = pki.generate_ca()
    kp = pki.issue_server(ca, ["10.0.0.5", "fd7a::1", "10.0.0.5"], ["node-1"])
    c = kp.certificate
    c.verify_directly_issued_by(ca.certificate)
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "fd7a::1"]
    assert san.get_values_for_type(x509.DNSName) == ["node-1"]
    assert pki.ext_key_usage(c) == (ExtendedKeyUsageOID.SERVER_AUTH,)
    assert not pki.is_client_cert(c)
    life = c.not_valid_after_utc - c.not_valid_before_utc
    assert life <= pki.SERVER_TTL + pki.BACKDATE
    with pytest.raises(pki.PKIError):
        pki.issue_server(ca, [], [])


def test_needs_renewal_at_half_life():
    ca = pki.generate_ca()
    t0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    kp = pki.issue_server(ca, ["127.0.0.1"], ttl=dt.timedelta(hours=24), now=t0)
    start = t0 - pki.BACKDATE
    half = start + (t0 + dt.timedelta(hours=24) - start) / 2
    assert pki.renewal_time(kp.crt) == half
    assert not pki.needs_renewal(kp.certificate, t0)
    assert not pki.needs_renewal(kp.crt, half - dt.timedelta(seconds=1))
    assert pki.needs_renewal(kp.crt, half)
    assert pki.needs_renewal(kp.crt, t0 + dt.timedelta(days=2))  # expired
    assert pki.needs_renewal(kp.crt, start - dt.timedelta(seconds=1))  # not valid yet


def test_ed25519_ca_is_refused_with_reason_and_fix():
    ca = ed25519_ca()
    with pytest.raises(pki.UnsupportedKeyError) as e:
        pki.check_tls_usable(ca.crt, ca.key)
    msg = str(e.value)
    assert "Ed25519" in msg and "grpcio" in msg and "ECDSA P-256" in msg and "spanctl gen secrets" in msg
    assert "PRIVATE KEY" not in msg
    # it still signs (loading works), only TLS cannot use it
    kp = pki.issue_client(ca, ["os:admin"])
    kp.certificate.verify_directly_issued_by(ca.certificate)


def test_bad_pem_is_a_pki_error_without_material():
    with pytest.raises(pki.PKIError):
        pki.load_certificate(b"nope")
    with pytest.raises(pki.PKIError) as e:
        pki.load_private_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert "AAAA" not in str(e.value)


def test_write_secret_file_atomic_0600(tmp_path):
    p = tmp_path / "key.pem"
    p.write_text("old")
    p.chmod(0o644)
    pki.write_secret_file(p, b"secret")
    assert p.read_bytes() == b"secret"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["key.pem"]

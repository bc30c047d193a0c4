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


def talos_label(key_pem: bytes) -> bytes:
    """A PKCS#8 key PEM under Talos's ``ED25519 PRIVATE KEY`` label (as Talos writes Ed25519 keys)."""
    return key_pem.replace(b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN ED25519 PRIVATE KEY-----").replace(
        b"-----END PRIVATE KEY-----", b"-----END ED25519 PRIVATE KEY-----"
    )


def test_an_ed25519_ca_is_usable_and_its_leaves_are_ed25519_as_talos_issues_them():
    ca = ed25519_ca()
    pki.check_tls_usable(ca.crt, ca.key)
    for kp in (pki.issue_client(ca, ["os:admin"]), pki.issue_server(ca, ["127.0.0.1"], ["n"])):
        kp.certificate.verify_directly_issued_by(ca.certificate)
        assert pki.key_algorithm(kp.certificate) == "Ed25519"
        assert pki.key_algorithm(pki.load_private_key(kp.key)) == "Ed25519"
    # an ECDSA CA keeps ECDSA P-256 leaves
    assert (
        pki.key_algorithm(pki.issue_client(pki.generate_ca(), ["os:admin"]).certificate) == "ECDSA secp256r1"
    )


def test_talos_ed25519_key_label_is_read():
    ca = ed25519_ca()
    labelled = talos_label(ca.key)
    assert b"BEGIN ED25519 PRIVATE KEY" in labelled
    assert pki.key_algorithm(pki.load_private_key(labelled)) == "Ed25519"
    assert pki.normalize_key_pem(labelled) == ca.key
    pki.check_tls_usable(ca.crt, labelled)
    kp = pki.issue_client(pki.KeyPair(ca.crt, labelled), ["os:reader"])
    kp.certificate.verify_directly_issued_by(ca.certificate)
    # SEC1 EC keys are left as they are
    sec1 = b"-----BEGIN EC PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----\n"
    assert pki.normalize_key_pem(sec1) == sec1


def test_a_ca_key_that_is_not_the_certificates_is_refused():
    ca, other = ed25519_ca(), pki.generate_ca()
    with pytest.raises(pki.PKIError, match=r"not the key of machine\.ca\.crt") as e:
        pki.check_tls_usable(ca.crt, other.key)
    assert "PRIVATE KEY" not in str(e.value)


def test_trustd_signs_ed25519_and_p256_csrs_and_refuses_other_keys():
    ca = ed25519_ca()
    for ca_crt in (ca.crt, None):  # an Ed25519 CSR (a Talos worker's) and a P-256 one
        csr, key = pki.server_csr(["10.0.0.7"], ["w1"], ca_crt=ca_crt)
        crt, sans = pki.sign_server_csr(ca, csr)
        c = pki.load_certificate(crt)
        c.verify_directly_issued_by(ca.certificate)
        assert sans == ["10.0.0.7", "w1"]
        assert c.public_key() == pki.load_private_key(key).public_key()
    p384 = ec.generate_private_key(ec.SECP384R1())
    req = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("x")]), critical=False)
        .sign(p384, hashes.SHA256())
    )
    from cryptography.hazmat.primitives import serialization

    with pytest.raises(pki.PKIError, match="ECDSA P-256 or Ed25519, got ECDSA secp384r1"):
        pki.sign_server_csr(ca, req.public_bytes(serialization.Encoding.PEM))


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

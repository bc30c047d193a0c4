"""trustd: token check, CSR validation and SAN filtering (machined.pki.sign_server_csr)."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from machined import pki
from machined.apid.trustd import endpoint_target, token_ok

CA = pki.generate_ca()


def _csr(key=None, sans=None, *, ca=False, org=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.COMMON_NAME, "w1")]
    if org:
        names.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if sans is None:
        sans = [x509.IPAddress(ipaddress.ip_address("10.0.0.2")), x509.DNSName("w1")]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_token_check():
    assert token_ok("abcdef.0123456789abcdef", "abcdef.0123456789abcdef")
    assert not token_ok("abcdef.0123456789abcdeX", "abcdef.0123456789abcdef")
    assert not token_ok(None, "abcdef.0123456789abcdef")
    assert not token_ok("", "")
    assert not token_ok("x", None)


def test_signs_a_server_csr():
    csr, key = pki.server_csr(["10.0.0.2", "fd00::2"], ["w1"])
    crt, sans = pki.sign_server_csr(CA, csr, dt.timedelta(minutes=10))
    c = pki.load_certificate(crt)
    c.verify_directly_issued_by(CA.certificate)
    assert c.public_key() == pki.load_private_key(key).public_key()
    assert sans == ["10.0.0.2", "fd00::2", "w1"]
    assert not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert pki.ext_key_usage(c) == (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    assert not pki.is_client_cert(c)
    assert c.not_valid_after_utc - c.not_valid_before_utc <= dt.timedelta(minutes=11)


def test_wrong_curve_refused():
    with pytest.raises(pki.PKIError, match="P-256"):
        pki.sign_server_csr(CA, _csr(ec.generate_private_key(ec.SECP384R1())))


def test_bad_signature_refused():
    pem = _csr()
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    bad = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(pki.PKIError, match="signature"):
        pki.sign_server_csr(CA, bad)


def test_ca_request_refused():
    with pytest.raises(pki.PKIError, match="CA:true"):
        pki.sign_server_csr(CA, _csr(ca=True))


def test_garbage_refused():
    with pytest.raises(pki.PKIError, match="PEM"):
        pki.sign_server_csr(CA, b"not a csr")


def test_san_filtering_and_no_roles():
    sans = [
        x509.IPAddress(ipaddress.ip_address("10.0.0.2")),
        x509.DNSName("w1"),
        x509.RFC822Name("root@example.com"),
        x509.UniformResourceIdentifier("spiffe://x/y"),
    ]
    crt, granted = pki.sign_server_csr(CA, _csr(sans=sans, org="os:admin"))
    c = pki.load_certificate(crt)
    got = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(g.value) for g in got] == ["10.0.0.2", "w1"] == granted
    assert pki.roles_of(c) == frozenset()


def test_only_unusable_sans_refused():
    with pytest.raises(pki.PKIError, match="no IP or DNS"):
        pki.sign_server_csr(CA, _csr(sans=[x509.RFC822Name("a@b.c")]))
    with pytest.raises(pki.PKIError, match="no IP or DNS"):
        pki.sign_server_csr(CA, _csr(sans=[]))


def test_endpoint_target():
    assert endpoint_target("10.0.0.1") == "10.0.0.1:50001"
    assert endpoint_target("cp:1234") == "cp:1234"
    assert endpoint_target("fd00::1") == "[fd00::1]:50001"
    assert endpoint_target("[fd00::1]:5") == "[fd00::1]:5"

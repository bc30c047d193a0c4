import argparse
import base64
import datetime as dt

import pytest
import yaml

from machined import gen, pki
from machined.apid.main import StartError, listen_address, load_ca, run
from machined.apid.testing import ed25519_ca
from machined.apid.tls import Identity


def test_identity_issues_server_and_impersonator_certs(tmp_path):
    ca = pki.generate_ca()
    ident = Identity(ca, "node-1", ["10.0.0.1", "fd7a:1::5"], server_ttl=dt.timedelta(hours=24))
    srv = ident.server.certificate
    srv.verify_directly_issued_by(ca.certificate)
    assert not pki.is_client_cert(srv)
    assert pki.roles_of(ident.client.certificate) == {"os:impersonator"}
    assert pki.is_client_cert(ident.client.certificate)
    assert not ident.needs_renewal()
    assert ident.needs_renewal(dt.datetime.now(dt.UTC) + dt.timedelta(hours=13))
    gen0 = ident.generation
    first = ident.server_context(tmp_path)
    assert ident.server_context(tmp_path) is first  # one context per certificate generation
    assert ident.server_context(tmp_path, require_client=False) is not first  # trustd's
    ident.renew(["10.0.0.2"])
    assert ident.generation == gen0 + 1
    assert ident.server_context(tmp_path) is not first  # new handshakes get the renewed certificate
    assert ident.addresses == ["10.0.0.2"]
    assert list(tmp_path.iterdir()) == []  # the key files OpenSSL read are gone


def test_identity_with_an_ed25519_ca(tmp_path):
    ident = Identity(ed25519_ca(), "n", ["127.0.0.1"])
    assert pki.key_algorithm(ident.server.certificate) == "Ed25519"
    assert pki.roles_of(ident.client.certificate) == {"os:impersonator"}
    ident.server_context(tmp_path)
    ident.client_context(tmp_path)


def _config(tmp_path, ca=None, worker=False):
    s = gen.gen_secrets()
    g = gen.gen_config("t", "https://127.0.0.1:6443", s, discovery=["https://d.invalid/"])
    text = g.worker if worker else g.controlplane
    if ca is not None:
        docs = list(yaml.safe_load_all(text))
        docs[0]["machine"]["ca"] = {
            "crt": base64.b64encode(ca.crt).decode(),
            "key": base64.b64encode(ca.key).decode(),
        }
        text = yaml.safe_dump_all(docs)
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p, s


def test_load_ca(tmp_path):
    p, s = _config(tmp_path)
    ca, sans = load_ca(p)
    assert ca == s.os_ca and sans == ()
    with pytest.raises(StartError, match="no key"):
        load_ca(_config(tmp_path, worker=True)[0])
    ed = ed25519_ca()
    assert load_ca(_config(tmp_path, ca=ed)[0])[0] == ed  # Talos's default: served
    mismatched = pki.KeyPair(ed.crt, pki.generate_ca().key)
    with pytest.raises(StartError, match=r"refusing to serve: machine\.ca\.key is not the key"):
        load_ca(_config(tmp_path, ca=mismatched)[0])
    with pytest.raises(StartError, match="cannot read"):
        load_ca(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("version: v1alpha1\nmachine: {type: nope}\n")
    with pytest.raises(StartError, match="not a valid machine config"):
        load_ca(tmp_path / "bad.yaml")


async def test_run_exits_2_on_a_ca_key_that_does_not_match(tmp_path, capsys):
    p, _ = _config(tmp_path, ca=pki.KeyPair(ed25519_ca().crt, pki.generate_ca().key))
    ns = argparse.Namespace(
        config=p, machined_socket=tmp_path / "s", listen="127.0.0.1:0", hostname="n", address=[],
        node_port=50000, cert_ttl=3600.0, debug=False,
    )  # fmt: skip
    assert await run(ns) == 2
    err = capsys.readouterr().err
    assert "refusing to serve" in err and "not the key of machine.ca.crt" in err
    assert "PRIVATE KEY" not in err


def test_listen_address():
    assert listen_address(":50000") == "[::]:50000"
    assert listen_address("127.0.0.1:1") == "127.0.0.1:1"

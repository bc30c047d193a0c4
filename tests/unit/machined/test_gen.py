import base64
import stat

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from machined import gen, pki
from machined.config import ConfigValidationError, MachineConfig

K8S = "https://192.0.2.1:6443"
DISC = "https://d.example/"


def test_gen_secrets_shape():
    s = gen.gen_secrets()
    assert len(base64.b64decode(s.cluster_id, validate=True)) == 32
    assert len(base64.b64decode(s.cluster_secret, validate=True)) == 32
    assert s.cluster_id != s.cluster_secret
    assert len(s.token) == 23 and s.token[6] == "."
    assert pki.key_algorithm(s.os_ca.certificate) == "ECDSA secp256r1"
    assert s.warnings == ()
    assert s.cluster_secret not in repr(s) and s.token not in repr(s)


def test_secrets_roundtrip_and_talos_layout(tmp_path):
    s = gen.gen_secrets()
    doc = yaml.safe_load(s.to_yaml())
    assert doc["certs"]["os"]["crt"] == base64.b64encode(s.os_ca.crt).decode()
    assert doc["trustdinfo"]["token"] == s.token
    p = tmp_path / "secrets.yaml"
    s.write(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert gen.Secrets.from_yaml(p.read_bytes()) == s
    # a Talos bundle carries more sections: ignored
    doc["secrets"] = {"bootstraptoken": "x", "secretboxencryptionsecret": "y"}
    doc["certs"]["etcd"] = {"crt": "", "key": ""}
    assert gen.Secrets.from_yaml(yaml.safe_dump(doc)) == s


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["cluster"].pop("secret"), "cluster.secret"),
        (lambda d: d["cluster"].__setitem__("secret", "c2hvcnQ="), "cluster.secret"),
        (lambda d: d["certs"]["os"].__setitem__("crt", "bm90IGEgY2VydA=="), "certs.os.crt"),
        (lambda d: d.pop("trustdinfo"), "trustdinfo.token"),
    ],
)
def test_secrets_bad_bundle_names_field(mutate, field):
    doc = gen.gen_secrets().to_dict()
    mutate(doc)
    with pytest.raises(gen.GenError, match=field.replace(".", r"\.")):
        gen.Secrets.from_yaml(yaml.safe_dump(doc))


def test_ed25519_secrets_load_without_warning():
    from machined.apid.testing import ed25519_ca

    s = gen.gen_secrets()
    doc = s.to_dict()
    ca = ed25519_ca()
    doc["certs"]["os"] = {"crt": base64.b64encode(ca.crt).decode(), "key": base64.b64encode(ca.key).decode()}
    s2 = gen.Secrets.from_yaml(yaml.safe_dump(doc))
    assert s2.warnings == ()  # apid and spanctl serve Ed25519 (TLS through OpenSSL)


def test_gen_config_files_parse_and_carry_secrets(tmp_path):
    s = gen.gen_secrets()
    g = gen.gen_config(
        "demo", "https://10.0.0.1:6443", s, cert_sans=["10.0.0.1"], discovery=["https://disc.example:3000/"]
    )
    cp = MachineConfig.parse(g.controlplane)
    wk = MachineConfig.parse(g.worker)
    assert cp.warnings == () and wk.warnings == ()
    for m, text in ((cp, g.controlplane), (wk, g.worker)):
        v = m.v1alpha1
        assert v.token == s.token
        assert v.ca.crt == s.os_ca.crt
        assert v.cluster_id == s.cluster_id
        assert v.cluster_secret == base64.b64decode(s.cluster_secret)
        assert v.cluster_name == "demo"
        assert v.control_plane_endpoint == "https://10.0.0.1:6443"
        assert v.discovery_service_endpoint is None  # Talos 1.14's layout: a DiscoveryServiceConfig
        assert [(e.name, e.url) for e in m.discovery_endpoints] == [("default", "https://disc.example:3000/")]
        assert v.cert_sans == ("10.0.0.1",)
        assert m.kubespan.enabled
        docs = list(yaml.safe_load_all(text))
        assert docs[0]["cluster"]["controlPlane"] == {"endpoint": "https://10.0.0.1:6443"}
        assert "discovery" not in docs[0]["cluster"]
    assert cp.v1alpha1.machine_type == "controlplane" and cp.v1alpha1.ca.key == s.os_ca.key
    assert wk.v1alpha1.machine_type == "worker" and wk.v1alpha1.ca.key is None

    written = g.write(tmp_path)
    assert sorted(p.name for p in written) == ["controlplane.yaml", "talosconfig", "worker.yaml"]
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    with pytest.raises(gen.GenError, match="overwrite"):
        g.write(tmp_path)
    g.write(tmp_path, overwrite=True)


def test_talosconfig_client_cert():
    s = gen.gen_secrets()
    g = gen.gen_config(
        "demo", K8S, s, endpoints=["10.0.0.1"], nodes=["10.0.0.2"], discovery=["https://d.example/"]
    )
    doc = yaml.safe_load(g.talosconfig)
    assert doc["context"] == "demo"
    ctx = gen.load_talosconfig_context(g.talosconfig)
    assert ctx["endpoints"] == ["10.0.0.1"] and ctx["nodes"] == ["10.0.0.2"]
    assert ctx["ca"] == s.os_ca.crt
    crt = x509.load_pem_x509_certificate(ctx["crt"])
    crt.verify_directly_issued_by(s.os_ca.certificate)
    assert pki.roles_of(crt) == {"os:admin"}
    assert pki.ext_key_usage(crt) == (ExtendedKeyUsageOID.CLIENT_AUTH,)
    assert pki.key_algorithm(crt) == "ECDSA secp256r1"
    assert pki.key_algorithm(pki.load_private_key(ctx["key"])) == "ECDSA secp256r1"


def test_gen_config_patches():
    s = gen.gen_secrets()
    g = gen.gen_config(
        "demo",
        K8S,
        s,
        ["machine:\n  certSANs: [a.example]\n"],
        controlplane_patches=["apiVersion: v1alpha1\nkind: KubeSpanConfig\nmtu: 1380\n"],
        worker_patches=['[{"op": "add", "path": "/cluster/clusterName", "value": "w"}]'],
        discovery=["https://d.example/"],
    )
    cp, wk = MachineConfig.parse(g.controlplane), MachineConfig.parse(g.worker)
    assert cp.v1alpha1.cert_sans == ("a.example",) == wk.v1alpha1.cert_sans
    assert cp.kubespan.mtu == 1380 and wk.kubespan.mtu != 1380
    assert wk.v1alpha1.cluster_name == "w" and cp.v1alpha1.cluster_name == "demo"


def test_gen_config_invalid_patch_names_field():
    with pytest.raises(ConfigValidationError, match="mtu"):
        gen.gen_config(
            "demo", K8S, None, ["apiVersion: v1alpha1\nkind: KubeSpanConfig\nmtu: 5\n"], discovery=[DISC]
        )
    with pytest.raises(gen.GenError):
        gen.gen_config("", K8S, discovery=[DISC])


def test_several_discovery_services_one_document_each():
    g = gen.gen_config("demo", K8S, discovery=["https://a.example/", "http://10.0.0.1:3000,10.0.0.2:3000"])
    m = MachineConfig.parse(g.worker)
    assert [(e.name, e.url) for e in m.discovery_endpoints] == [
        ("default", "https://a.example/"),
        ("discovery-2", "http://10.0.0.1:3000,10.0.0.2:3000"),
    ]


def test_discovery_is_required_by_the_library():
    with pytest.raises(gen.GenError, match="discovery"):
        gen.gen_config("demo", K8S, discovery=[])
    with pytest.raises(gen.GenError, match="discovery"):
        gen.gen_config("demo", K8S, discovery=[" "])


@pytest.mark.parametrize(
    "endpoint, says",
    [
        # as talosctl's validateClusterEndpoint: scheme and port, then the https scheme, with a "try:"
        (
            "192.0.2.1",
            "no scheme and port specified for the cluster endpoint URL; try: https://192.0.2.1:6443",
        ),
        ("192.0.2.1:6443", "no scheme specified for the cluster endpoint URL; try: https://192.0.2.1:6443"),
        (
            "cp.example",
            "no scheme and port specified for the cluster endpoint URL; try: https://cp.example:6443",
        ),
        ("http://cp.example:6443", "should have scheme https://; try: https://cp.example:6443"),
        ("http://cp.example", "should have scheme https://; try: https://cp.example:6443"),
        ("https://cp.example:99999", "not a valid URL"),
        ("https://", "must name a host"),
        ("https://bad_host:6443", "must name a host"),
        ("https://u:pw@cp.example:6443", "must not contain credentials"),
        ("", "must be a URL"),
    ],
)
def test_cluster_endpoint_checked_as_talosctl(endpoint, says):
    with pytest.raises(gen.GenError) as e:
        gen.gen_config("demo", endpoint, discovery=[DISC])
    assert says in str(e.value)
    assert "pw" not in str(e.value)


@pytest.mark.parametrize(
    "endpoint",
    ["https://192.0.2.1:6443", "https://cp.example", "https://[2001:db8::1]:6443", "https://lb.example:443/"],
)
def test_cluster_endpoint_accepted(endpoint):
    g = gen.gen_config("demo", endpoint, discovery=[DISC])
    assert MachineConfig.parse(g.controlplane).v1alpha1.control_plane_endpoint == endpoint


def test_a_bad_control_plane_endpoint_in_a_config_is_refused():
    g = gen.gen_config("demo", K8S, discovery=[DISC])
    text = g.worker.replace(K8S, "not a url")
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.parse(text)
    assert any(p.location.endswith("cluster.controlPlane.endpoint") for p in e.value.problems)


def test_a_bundle_whose_os_key_is_not_the_certificates_warns():
    from machined.apid.testing import ed25519_ca

    doc = gen.gen_secrets().to_dict()
    ca, other = ed25519_ca(), pki.generate_ca()
    doc["certs"]["os"] = {
        "crt": base64.b64encode(ca.crt).decode(),
        "key": base64.b64encode(other.key).decode(),
    }
    s = gen.Secrets.from_yaml(yaml.safe_dump(doc))
    assert len(s.warnings) == 1 and "not the key of machine.ca.crt" in s.warnings[0]
    assert "PRIVATE KEY" not in s.warnings[0]


def test_a_talos_bundle_with_an_ed25519_label_makes_ed25519_client_configs():
    """Talos's secrets.yaml: the OS key under ``ED25519 PRIVATE KEY``; the talosconfig we generate from it
    holds an Ed25519 admin certificate signed by that CA, as talosctl's would."""
    from machined.apid.testing import ed25519_ca

    ca = ed25519_ca()
    label = ca.key.replace(b"BEGIN PRIVATE KEY", b"BEGIN ED25519 PRIVATE KEY").replace(
        b"END PRIVATE KEY", b"END ED25519 PRIVATE KEY"
    )
    doc = gen.gen_secrets().to_dict()
    doc["certs"]["os"] = {"crt": base64.b64encode(ca.crt).decode(), "key": base64.b64encode(label).decode()}
    doc["secrets"] = {"bootstraptoken": "abcdef.0123456789abcdef"}  # Talos's extra section: ignored
    s = gen.Secrets.from_yaml(yaml.safe_dump(doc))
    assert s.warnings == () and s.os_ca.key == label
    g = gen.gen_config("t", "https://127.0.0.1:6443", s, discovery=["https://d.invalid/"])
    ctx = gen.load_talosconfig_context(g.talosconfig)
    crt = pki.load_certificate(ctx["crt"])
    crt.verify_directly_issued_by(ca.certificate)
    assert pki.key_algorithm(crt) == "Ed25519" and pki.roles_of(crt) == {"os:admin"}

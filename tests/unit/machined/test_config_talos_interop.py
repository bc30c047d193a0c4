"""Talos interop, second pass (issue 16): configs shaped the way Talos v1.12-v1.14 writes them load, or fail,
where Talos's own config validation lets them or not.

Every case is built from facts read in siderolabs/talos ``pkg/machinery/config`` (kind, key and field names,
and the rules its validators apply); the file in Talos is named beside each table.
"""

from __future__ import annotations

import base64
import datetime
import logging
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from machined.config import ConfigValidationError, MachineConfig
from machined.config.testing import new_secret


def _ca() -> tuple[str, str]:
    """An Ed25519 OS CA (Talos's default), as ``machine.ca.crt`` / ``machine.ca.key`` values (base64 PEM)."""
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "talos")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None)
    )
    crt_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return base64.b64encode(crt_pem).decode(), base64.b64encode(key_pem).decode()


CA_CRT, CA_KEY = _ca()


def _v1(machine_type: str = "worker", **machine: Any) -> dict[str, Any]:
    return {"version": "v1alpha1", "machine": {"type": machine_type, **machine}}


def _problems(docs: list[Any]) -> list[str]:
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.from_documents(docs)
    return [str(p) for p in e.value.problems]


# --- item 3: machine.ca.key: "" ---------------------------------------------------------------------
# talos v1alpha1_validation.go: the CA key counts by its decoded length (len(Key) == 0 = no key); a stock
# worker.yaml (testdata/stability/v1.14/base-worker.yaml) carries `ca: {crt: ..., key: ""}`.

CA_KEY_CASES = [
    # (machine type, machine.ca.key value, key loaded)
    pytest.param("worker", "", False, id="worker-empty-key-is-no-key"),
    pytest.param("worker", None, False, id="worker-null-key"),
    pytest.param("controlplane", CA_KEY, True, id="controlplane-key"),
]


@pytest.mark.parametrize(("machine_type", "key", "loaded"), CA_KEY_CASES)
def test_machine_ca_key_empty_is_absent(machine_type: str, key: str | None, loaded: bool) -> None:
    cfg = MachineConfig.from_documents([_v1(machine_type, ca={"crt": CA_CRT, "key": key})])
    ca = cfg.v1alpha1.ca
    assert ca is not None and ca.crt.startswith(b"-----BEGIN CERTIFICATE-----")
    assert (ca.key is not None) is loaded


def test_machine_ca_key_not_base64_pem_still_rejected() -> None:
    (p,) = _problems([_v1("controlplane", ca={"crt": CA_CRT, "key": "bm90IGEga2V5"})])
    assert p.startswith("v1alpha1.machine.ca.key") and "PEM private key" in p


# --- item 5: a DiscoveryServiceConfig endpoint with a path ---------------------------------------------
# talos types/cluster/discovery_service.go: the endpoint must have an http, https or grpc scheme and a host;
# nothing else is checked, and NormalizeEndpoint keeps only host and port (80 for http, else 443), which
# internal/app/machined/pkg/controllers/cluster/config.go uses for every discovery service (the legacy
# cluster.discovery one too). So a path, query or fragment is ignored.

ENDPOINT_PATH_CASES = [
    # (endpoint as written, endpoint used)
    pytest.param("https://discovery.talos.dev/", "https://discovery.talos.dev/", id="talos-default-kept"),
    pytest.param("https://d.example:3000", "https://d.example:3000", id="no-path-kept"),
    pytest.param("https://d.example/some/path", "https://d.example/", id="path-dropped"),
    pytest.param("grpc://d.example:3000/v1/?x=1", "grpc://d.example:3000/", id="path-and-query-dropped"),
    pytest.param("http://10.0.0.1:3000#frag", "http://10.0.0.1:3000/", id="fragment-dropped"),
    pytest.param(
        "https://10.0.0.1:3000,10.0.0.2:3000/p", "https://10.0.0.1:3000,10.0.0.2:3000/", id="host-list"
    ),
]


def _with_discovery(endpoint: str) -> list[dict[str, Any]]:
    v1 = _v1(network={"kubespan": {"enabled": True}})
    v1["cluster"] = {"id": "test-cluster", "secret": new_secret()}
    return [
        v1,
        {"apiVersion": "v1alpha1", "kind": "DiscoveryServiceConfig", "name": "ds", "endpoint": endpoint},
    ]


@pytest.mark.parametrize(("written", "used"), ENDPOINT_PATH_CASES)
def test_discovery_endpoint_path_is_ignored(
    written: str, used: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "machined.config")
    cfg = MachineConfig.from_documents(_with_discovery(written))
    assert cfg.mesh().discovery_urls == (used,)
    logged = [r.getMessage() for r in caplog.records if "is ignored, as Talos does" in r.getMessage()]
    assert len(logged) == (written != used)
    assert all(
        "DiscoveryServiceConfig[ds].endpoint" in m and "some" not in m and "x=1" not in m for m in logged
    )


def test_legacy_discovery_endpoint_path_is_ignored_too() -> None:
    v1 = _v1(network={"kubespan": {"enabled": True}})
    v1["cluster"] = {
        "id": "test-cluster",
        "secret": new_secret(),
        "discovery": {"enabled": True, "registries": {"service": {"endpoint": "https://d.example/x"}}},
    }
    assert MachineConfig.from_documents([v1]).mesh().discovery_urls == ("https://d.example/",)


@pytest.mark.parametrize(
    "endpoint",
    [
        pytest.param("ftp://d.example/", id="scheme"),
        pytest.param("https:///path-only", id="no-host"),
        pytest.param("https://user:pw@d.example/path", id="credentials"),
    ],
)
def test_discovery_endpoint_still_needs_scheme_and_host(endpoint: str) -> None:
    (p,) = _problems(_with_discovery(endpoint))
    assert p.startswith("DiscoveryServiceConfig[ds].endpoint (document 2): must")
    assert "pw" not in p


# --- item 9: small ones --------------------------------------------------------------------------------


def _kubespan_docs(where: str, **kubespan: Any) -> list[dict[str, Any]]:
    """KubeSpan settings in v1alpha1 machine.network.kubespan ("v1") or a KubeSpanConfig document ("doc")."""
    v1 = _v1()
    v1["cluster"] = {"id": "test-cluster", "secret": new_secret()}
    ds = {
        "apiVersion": "v1alpha1",
        "kind": "DiscoveryServiceConfig",
        "name": "ds",
        "endpoint": "https://d.example/",
    }
    if where == "v1":
        v1["machine"]["network"] = {"kubespan": {"enabled": True, **kubespan}}
        return [v1, ds]
    return [v1, {"apiVersion": "v1alpha1", "kind": "KubeSpanConfig", "enabled": True, **kubespan}, ds]


# mtu -- talos v1alpha1_provider.go NetworkKubeSpan.MTU: 0 (or unset) is KubeSpanLinkMTU (1420);
# types/network/kubespan.go KubeSpanConfigV1Alpha1.Validate: a set mtu below KubeSpanLinkMinimumMTU (1280) fails
MTU_CASES = [
    # (where, mtu, effective mtu or None = rejected)
    pytest.param("v1", 0, 1420, id="v1alpha1-0-is-default"),
    pytest.param("v1", None, 1420, id="v1alpha1-unset"),
    pytest.param("v1", 1380, 1380, id="v1alpha1-set"),
    pytest.param("v1", 1000, None, id="v1alpha1-below-1280"),
    pytest.param("doc", 0, None, id="KubeSpanConfig-0-below-1280"),
    pytest.param("doc", 1380, 1380, id="KubeSpanConfig-set"),
]


@pytest.mark.parametrize(("where", "mtu", "effective"), MTU_CASES)
def test_kubespan_mtu(where: str, mtu: int | None, effective: int | None) -> None:
    docs = _kubespan_docs(where, **({} if mtu is None else {"mtu": mtu}))
    if effective is None:
        (p,) = _problems(docs)
        assert p.split(" ")[0] in ("v1alpha1.machine.network.kubespan.mtu", "KubeSpanConfig.mtu")
        assert "1280" in p
    else:
        assert MachineConfig.from_documents(docs).mesh().config.mtu == effective


# machine.token -- talos v1alpha1_validation.go does not check machine.token at all (v1alpha1_types.go:
# MachineToken, yaml "token"); "" is an unset token. A set one keeps our format check.
TOKEN_CASES = [
    pytest.param("", None, id="empty-is-unset"),
    pytest.param(None, None, id="null"),
    pytest.param("d8cwfa.eyvpi0xwxyarbfid", "d8cwfa.eyvpi0xwxyarbfid", id="set"),
]


@pytest.mark.parametrize(("token", "read"), TOKEN_CASES)
def test_machine_token(token: str | None, read: str | None) -> None:
    assert MachineConfig.from_documents([_v1(token=token)]).v1alpha1.token == read


# DiscoveryServiceConfig name -- talos types/cluster/discovery_service.go Validate: only "name is required";
# "legacy" is the name v1alpha1_discoveryconfig.go gives the cluster.discovery service.
NAME_CASES = [
    # (name, error or None)
    pytest.param("Primary", None, id="uppercase-accepted"),
    pytest.param("self hosted", None, id="any-string"),
    pytest.param("legacy", None, id="legacy-without-cluster-discovery"),
    pytest.param("", "DiscoveryServiceConfig (document 2).name (document 2): is required", id="empty"),
]


@pytest.mark.parametrize(("name", "error"), NAME_CASES)
def test_discovery_service_name(name: str, error: str | None) -> None:
    docs = _with_discovery("https://d.example/")
    docs[1]["name"] = name
    if error is None:
        cfg = MachineConfig.from_documents(docs)
        assert [e.name for e in cfg.discovery_endpoints] == [name]
        assert cfg.document_kinds()[1] == f"DiscoveryServiceConfig[{name}]"
    else:
        assert _problems(docs) == [error]


# the v1alpha1 document -- talos configloader/internal/decoder/decoder.go: a document without kind that has
# one of machine, cluster, debug, persist is v1alpha1; container/container.go: a config without v1alpha1 is
# allowed (its validation simply has no v1alpha1 part)
V1ALPHA1_CASES = [
    pytest.param({"machine": {"type": "controlplane"}}, "controlplane", id="machine-without-version"),
    pytest.param(
        {"persist": True, "debug": False, "machine": {"type": "worker"}}, "worker", id="persist-debug"
    ),
    pytest.param({"version": "v1alpha1", "machine": {"type": "worker"}}, "worker", id="with-version"),
]


@pytest.mark.parametrize(("doc", "machine_type"), V1ALPHA1_CASES)
def test_untyped_document_with_machine_or_cluster_is_v1alpha1(doc: dict[str, Any], machine_type: str) -> None:
    cfg = MachineConfig.from_documents([doc])
    assert cfg.document_kinds() == ("v1alpha1",) and cfg.v1alpha1.machine_type == machine_type


def test_cluster_only_document_is_v1alpha1_without_machine_type() -> None:
    # talos: decoded as v1alpha1, then "unknown machine type" (v1alpha1_validation.go)
    assert _problems([{"cluster": {"clusterName": "c"}}]) == [
        "v1alpha1.machine.type (document 1): is required (one of controlplane, worker, init)"
    ]


def test_untyped_document_without_v1alpha1_keys_is_still_unidentified() -> None:
    assert _problems([_v1(), {"foo": 1}]) == [
        "document 2 (document 2): must have version: v1alpha1 (or machine:/cluster:), or apiVersion and kind"
    ]


def test_config_without_v1alpha1_document_loads_with_a_warning() -> None:
    cfg = MachineConfig.from_documents(
        [
            {"apiVersion": "v1alpha1", "kind": "KubeSpanConfig", "enabled": False},
            {"apiVersion": "v1alpha1", "kind": "AgentConfig", "nodename": "n1"},
        ]
    )
    assert cfg.document_kinds() == ("KubeSpanConfig", "AgentConfig")
    assert cfg.v1alpha1.machine_type == "worker" and cfg.v1alpha1.ca is None
    assert any(
        w.document == "v1alpha1" and "no version: v1alpha1 document" in w.message for w in cfg.warnings
    )


# filters.endpoints -- siderolabs/net net.go FilterIPs (called by talos controllers/cluster/local_affiliate.go
# when filters are set): the selection starts empty, a positive filter adds, a '!' filter removes.
FILTER_CASES = [
    # (filters, addresses selected from 10.0.0.1, 192.168.1.1, 2001:db8::1)
    pytest.param(["!10.0.0.0/8"], [], id="only-negated-selects-none"),
    pytest.param(["!10.0.0.0/8", "!::/0"], [], id="only-negated-two"),
    pytest.param(["0.0.0.0/0", "!10.0.0.0/8"], ["192.168.1.1"], id="positive-then-negated"),
    pytest.param(["0.0.0.0/0", "::/0", "!10.0.0.0/8"], ["192.168.1.1", "2001:db8::1"], id="all-but"),
    pytest.param([], ["10.0.0.1", "192.168.1.1", "2001:db8::1"], id="no-filters-keep-all"),
]


@pytest.mark.parametrize(("filters", "selected"), FILTER_CASES)
def test_endpoint_filters_as_talos(filters: list[str], selected: list[str]) -> None:
    import ipaddress

    from kubespan.affiliate import filter_ips

    cfg = MachineConfig.from_documents(_kubespan_docs("doc", filters={"endpoints": filters}))
    assert cfg.mesh().endpoint_filters == tuple(filters)  # as written (shown in the KubeSpanConfig resource)
    engine_filters = cfg.mesh_options("host").endpoint_filters
    ips = [ipaddress.ip_address(a) for a in ("10.0.0.1", "192.168.1.1", "2001:db8::1")]
    assert [str(ip) for ip in filter_ips(ips, engine_filters)] == selected
    warned = [w for w in cfg.warnings if "only negated" in w.message]
    assert len(warned) == (bool(filters) and all(f.startswith("!") for f in filters))


# --- item 2: Talos 1.14 configs: DiscoveryIdentityConfig ----------------------------------------------
# talos types/cluster/discovery_identity.go: kind DiscoveryIdentityConfig (apiVersion v1alpha1, unnamed),
# fields clusterID and clusterSecret, both required, clusterSecret std base64 of 32 bytes; its
# V1Alpha1ConflictValidate refuses it when v1alpha1 .cluster.id or .cluster.secret is non-empty.
# container/validate.go: DiscoveryServiceConfig documents need a cluster id and secret from either place.
# generate (testdata/stability/v1.14/base-worker.yaml): v1alpha1 without cluster.id/secret, a
# DiscoveryServiceConfig named default and the identity document, besides kinds machined does not use.

TALOS_CLUSTER_ID = "0raF93qnkMvF-FZNuvyGozXNdLiT2FOWSlyBaW4PR-w="  # url-safe alphabet: not checked by Talos


def _identity(cluster_id: Any = TALOS_CLUSTER_ID, secret: Any = None) -> dict[str, Any]:
    doc = {"apiVersion": "v1alpha1", "kind": "DiscoveryIdentityConfig", "clusterID": cluster_id}
    doc["clusterSecret"] = new_secret() if secret is None else secret
    return doc


def _talos_114(cluster: dict[str, Any] | None, identity: dict[str, Any] | None) -> list[dict[str, Any]]:
    v1 = _v1(ca={"crt": CA_CRT, "key": ""}, token="d8cwfa.eyvpi0xwxyarbfid")
    if cluster is not None:
        v1["cluster"] = cluster
    docs = [
        v1,
        {
            "apiVersion": "v1alpha1",
            "kind": "DiscoveryServiceConfig",
            "name": "default",
            "endpoint": "https://d.example/",
        },
        {"apiVersion": "v1alpha1", "kind": "KubeSpanConfig", "enabled": True},
        {"apiVersion": "v1alpha1", "kind": "HostnameConfig", "auto": "stable"},
    ]
    return docs + ([identity] if identity is not None else [])


IDENTITY_CASES = [
    # (v1alpha1 cluster block, identity document, problems (location prefix, rule part); [] = loads)
    pytest.param({"token": "abc"}, _identity(), [], id="gen-config-1.14"),
    pytest.param({"id": "", "secret": ""}, _identity(), [], id="empty-legacy-fields"),
    pytest.param(None, _identity(), [], id="no-cluster-block"),
    pytest.param(
        {"id": "legacy-id", "secret": new_secret()},
        _identity(),
        [
            (
                "DiscoveryIdentityConfig (document 5)",
                "must not be set together with v1alpha1 cluster.id/cluster.secret",
            )
        ],
        id="both-places",
    ),
    pytest.param(
        {"secret": new_secret()},
        _identity(),
        [  # Talos too: the conflict, and the legacy identity (which wins) has no id
            ("DiscoveryIdentityConfig (document 5)", "must not be set together"),
            ("v1alpha1.cluster.id (document 1)", "is required"),
        ],
        id="legacy-secret-only-and-document",
    ),
    pytest.param(
        {"id": ""},
        _identity(cluster_id=""),
        [("DiscoveryIdentityConfig.clusterID (document 5)", "is required")],
        id="empty-clusterID",
    ),
    pytest.param(
        None,
        {"apiVersion": "v1alpha1", "kind": "DiscoveryIdentityConfig", "clusterID": "x"},
        [("DiscoveryIdentityConfig.clusterSecret (document 5)", "is required")],
        id="no-clusterSecret",
    ),
    pytest.param(
        None,
        _identity(secret=base64.b64encode(b"16 bytes, short.").decode()),
        [("DiscoveryIdentityConfig.clusterSecret (document 5)", "must be base64 of 32 bytes")],
        id="short-clusterSecret",
    ),
    pytest.param(
        {"id": "", "secret": ""},
        None,
        [
            (
                "v1alpha1.cluster.id (document 1)",
                "is required: KubeSpan is enabled (or give a DiscoveryIdentityConfig",
            ),
            ("v1alpha1.cluster.secret (document 1)", "is required"),
        ],
        id="no-identity-anywhere",
    ),
]


@pytest.mark.parametrize(("cluster", "identity", "problems"), IDENTITY_CASES)
def test_discovery_identity_config(
    cluster: dict[str, Any] | None, identity: dict[str, Any] | None, problems: list[tuple[str, str]]
) -> None:
    docs = _talos_114(cluster, identity)
    if not problems:
        cfg = MachineConfig.from_documents(docs)
        assert identity is not None
        assert cfg.mesh().cluster_id == identity["clusterID"]
        assert cfg.mesh().cluster_secret == base64.b64decode(identity["clusterSecret"])
        assert cfg.mesh().discovery_urls == ("https://d.example/",)
        assert identity["clusterSecret"] not in cfg.redacted_yaml()
        assert "HostnameConfig" in cfg.document_kinds()
        return
    found = _problems(docs)
    assert len(found) == len(problems), found
    for text, (where, rule) in zip(found, problems, strict=True):
        assert text.startswith(where + ": ") and rule in text, text
    secrets = [identity.get("clusterSecret") if identity else None, (cluster or {}).get("secret")]
    assert not any(s and s in t for s in secrets for t in found)


def test_legacy_identity_alone_is_still_read() -> None:
    docs = _talos_114({"id": "legacy-id", "secret": new_secret()}, None)
    assert MachineConfig.from_documents(docs).mesh().cluster_id == "legacy-id"


# --- item 6: cluster.discovery together with DiscoveryServiceConfig documents -----------------------------
# talos types/cluster/discovery_service.go V1Alpha1ConflictValidate: a DiscoveryServiceConfig is refused when
# the v1alpha1 ClusterDiscoveryConfig pointer is set, i.e. any non-null cluster.discovery, even disabled.
# v1alpha1_discoveryconfig.go: alone, an enabled block with the service registry on is the service "legacy".

LEGACY_BLOCK = {"enabled": True, "registries": {"service": {"endpoint": "https://legacy.example/"}}}

LEGACY_PAIR_CASES = [
    # (cluster.discovery value (absent if "-"), DiscoveryServiceConfig present, services or None = refused)
    pytest.param(LEGACY_BLOCK, True, None, id="enabled-block-and-document"),
    pytest.param({"enabled": False}, True, None, id="disabled-block-and-document"),
    pytest.param({}, True, None, id="empty-block-and-document"),
    pytest.param(None, True, [("ds", "https://d.example/")], id="null-block-and-document"),
    pytest.param("-", True, [("ds", "https://d.example/")], id="document-only"),
    pytest.param(LEGACY_BLOCK, False, [("legacy", "https://legacy.example/")], id="block-only"),
]


@pytest.mark.parametrize(("block", "document", "services"), LEGACY_PAIR_CASES)
def test_legacy_discovery_with_documents(
    block: Any, document: bool, services: list[tuple[str, str]] | None
) -> None:
    docs = _with_discovery("https://d.example/") if document else _with_discovery("https://d.example/")[:1]
    if block != "-":
        docs[0]["cluster"]["discovery"] = block
    if services is not None:
        cfg = MachineConfig.from_documents(docs)
        assert [(e.name, e.url) for e in cfg.mesh().discovery] == services
        return
    (p,) = _problems(docs)
    assert p.startswith(
        "v1alpha1.cluster.discovery (document 1): must not be set together with DiscoveryServiceConfig "
        "documents (DiscoveryServiceConfig[ds] (document 2))"
    )


def test_legacy_discovery_pair_names_every_document() -> None:
    docs = _with_discovery("https://d.example/")
    docs.append(
        {"apiVersion": "v1alpha1", "kind": "DiscoveryServiceConfig", "name": "two", "endpoint": "https://e/"}
    )
    docs.append(
        {"apiVersion": "v1alpha1", "kind": "DiscoveryServiceConfig", "endpoint": "https://f/"}
    )  # no name
    docs[0]["cluster"]["discovery"] = {"enabled": False}
    found = _problems(docs)
    assert any(
        "(DiscoveryServiceConfig[ds] (document 2), DiscoveryServiceConfig[two] (document 3), document 4)" in p
        for p in found
    ), found
    assert any(p.startswith("DiscoveryServiceConfig (document 4).name") for p in found)


# --- item 7: harvestExtraEndpoints unset = false ------------------------------------------------------------
# talos types/network/kubespan.go KubeSpanConfigV1Alpha1.HarvestExtraEndpoints and v1alpha1_provider.go
# NetworkKubeSpan.HarvestExtraEndpoints: the *bool field harvestExtraEndpoints dereferenced safely (nil = false).

HARVEST_CASES = [
    # (where, harvestExtraEndpoints (None = unset), publish learned endpoints)
    pytest.param("doc", None, False, id="KubeSpanConfig-unset"),
    pytest.param("doc", False, False, id="KubeSpanConfig-false"),
    pytest.param("doc", True, True, id="KubeSpanConfig-true"),
    pytest.param("v1", None, False, id="v1alpha1-unset"),
    pytest.param("v1", True, True, id="v1alpha1-true"),
]


@pytest.mark.parametrize(("where", "harvest", "published"), HARVEST_CASES)
def test_harvest_extra_endpoints(where: str, harvest: bool | None, published: bool) -> None:
    docs = _kubespan_docs(where, **({} if harvest is None else {"harvestExtraEndpoints": harvest}))
    cfg = MachineConfig.from_documents(docs)
    assert cfg.kubespan.harvest_extra_endpoints is published
    assert cfg.mesh().publish_learned is published
    assert cfg.mesh_options("host").publish_learned is published

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

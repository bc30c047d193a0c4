"""deploy/kubernetes: every manifest validates offline against the Kubernetes OpenAPI schemas (strict:
unknown fields fail) with kubernetes-validate; the ServiceMonitor (a CRD, no bundled schema) gets a structural
check; the flags the manifests pass exist in the daemons' parsers; ports, probes and selectors line up."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from discovery.server import main as discovery_main
from kubespan import cli as kubespan_cli

kv = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (dev dependency) is not installed"
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # oldest version the manifests target (grpc probes are GA since 1.27)
SCHEMA_FILES = ["registry.yaml", "registry-tls.yaml", "mesh-agent.yaml"]


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def find(name: str, kind: str, obj_name: str | None = None) -> dict[str, Any]:
    hits = [
        d for d in docs(name) if d["kind"] == kind and (obj_name is None or d["metadata"]["name"] == obj_name)
    ]
    assert len(hits) == 1, (name, kind, obj_name, len(hits))
    return hits[0]


def test_every_file_is_covered():
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted([*SCHEMA_FILES, "servicemonitor.yaml"])


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_manifests_validate_strictly(name: str):
    for doc in docs(name):
        kv.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_rejects_a_typo():
    dep = find("registry.yaml", "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSION, strict=True)


def _container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def _flags(args: list[str]) -> set[str]:
    return {a.split("=")[0] for a in args if a.startswith("--")}


def _parser_flags(parser: Any) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


@pytest.mark.parametrize("name", ["registry.yaml", "registry-tls.yaml"])
def test_registry_deployment(name: str):
    dep = find(name, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = _container(dep, "discovery-service")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert _flags(c["args"]) <= _parser_flags(discovery_main.build_parser())
    discovery_main.parse_args(c["args"])  # the arguments parse as the daemon would
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 3000, "landing": 3001, "metrics": 2122}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c[probe]
        if "--certificate-path" in c["args"]:  # kubelet gRPC probes are plaintext only
            assert p["httpGet"] == {"path": "/healthz", "port": "landing"}
        else:
            assert p["grpc"] == {"port": 3000}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/var/lib/discovery-service"] == "state"
    claim = next(v for v in pod["volumes"] if v["name"] == "state")["persistentVolumeClaim"]["claimName"]
    assert find("registry.yaml", "PersistentVolumeClaim")["metadata"]["name"] == claim
    if name == "registry-tls.yaml":
        args = c["args"]
        cert_dir = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "tls")
        assert args[args.index("--certificate-path") + 1].startswith(cert_dir + "/")
        assert args[args.index("--key-path") + 1].startswith(cert_dir + "/")


@pytest.mark.parametrize("name", ["registry.yaml", "registry-tls.yaml"])
def test_services_select_the_pod_and_name_its_ports(name: str):
    dep = find(name, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in _container(dep, "discovery-service")["ports"]}
    services = [d for d in docs(name) if d["kind"] == "Service"]
    assert services
    for svc in services:
        assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, (svc["metadata"]["name"], p)


def test_network_policy_allows_exactly_the_served_ports():
    np = find("registry.yaml", "NetworkPolicy")
    allowed = {p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {3000, 3001, 2122}
    metrics_rule = next(r for r in np["spec"]["ingress"] if any(p["port"] == 2122 for p in r["ports"]))
    assert metrics_rule.get("from"), "metrics must not be open to everyone"
    assert np["spec"]["egress"] == []


def test_service_monitor_structure():
    """No schema is bundled for the Prometheus Operator's CRD; check the fields used by hand."""
    (sm,) = docs("servicemonitor.yaml")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    metrics = find("registry.yaml", "Service", "discovery-service-metrics")
    want = sm["spec"]["selector"]["matchLabels"]
    assert all(metrics["metadata"]["labels"].get(k) == v for k, v in want.items())
    # the gRPC Service must not match, or it would be scraped on its gRPC port
    grpc_svc = find("registry.yaml", "Service", "discovery-service")
    assert not all(grpc_svc["metadata"]["labels"].get(k) == v for k, v in want.items())
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [metrics["metadata"]["namespace"]]
    names = {p["name"] for p in metrics["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert ep["port"] in names and ep["path"] == "/metrics"


def _pod_cidr_script(out: Path) -> str:
    ds = find("mesh-agent.yaml", "DaemonSet")
    init = ds["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"][:2] == ["python3", "-c"]
    return init["command"][2].replace("/run/kubespan-agent/advertise", str(out))


def test_mesh_agent_pod_cidr_init_script(tmp_path: Path):
    out = tmp_path / "advertise"
    env = {**os.environ, "POD_CIDR": "10.244.3.0/24 fd00:10:244:3::/64", "NODE_NAME": "n1"}
    r = subprocess.run(
        [sys.executable, "-c", _pod_cidr_script(out)], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert shlex.split(out.read_text()) == [
        "--advertise",
        "10.244.3.0/24",
        "--advertise",
        "fd00:10:244:3::/64",
    ]


def test_mesh_agent_daemonset(tmp_path: Path):
    ds = find("mesh-agent.yaml", "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = _container(ds, "kubespan")
    assert pod["hostNetwork"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert c["securityContext"].get("privileged") is not True
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state["hostPath"]["path"] == "/var/lib/kubespan"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "secretKeyRef" in env["KUBESPAN_CLUSTER_SECRET"]["valueFrom"]
    # the command line, with the variables and the init container's output filled in, parses as `kubespan run`
    assert c["command"][:2] == ["/bin/sh", "-c"]
    out = tmp_path / "advertise"
    subprocess.run(
        [sys.executable, "-c", _pod_cidr_script(out)],
        env={**os.environ, "POD_CIDR": "10.244.3.0/24"},
        check=True,
        capture_output=True,
        timeout=30,
    )
    line = c["command"][2].replace("$(cat /run/kubespan-agent/advertise)", out.read_text().replace("\n", " "))
    line = line.replace('"$CLUSTER_ID"', "cluster-1").replace('"$NODE_NAME"', "node-1")
    argv = shlex.split(line)
    assert argv[:3] == ["exec", "kubespan", "run"]
    assert not re.search(r"\$", line), line
    ns = kubespan_cli.build_parser().parse_args(argv[2:])
    assert [str(a) for a in ns.advertise] == ["10.244.3.0/24"]
    assert str(ns.state_dir) == "/var/lib/kubespan" and ns.nodename == "node-1"
    # probes hit the agent's --http-addr
    port = ns.http_addr[1]  # (host, port)
    assert c["readinessProbe"]["httpGet"]["port"] == port
    assert c["livenessProbe"]["httpGet"]["port"] == port
    rb = find("mesh-agent.yaml", "ClusterRole")
    assert rb["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]

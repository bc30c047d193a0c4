"""docs/: the configuration reference matches the parsers, the shipped nginx config passes `nginx -t`, the
guide's YAML snippets parse and its links point at files that exist."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from discovery.testing import self_signed_cert

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
NGINX_CONF = ROOT / "deploy" / "nginx" / "discovery-service.conf"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_configuration_reference_is_up_to_date():
    gen = _generator()
    assert (DOCS / "configuration.md").read_text() == gen.render(), (
        "docs/configuration.md is out of date: run .venv/bin/python docs/gen_config_reference.py"
    )


def test_configuration_reference_lists_every_flag():
    gen = _generator()
    text = (DOCS / "configuration.md").read_text()
    for _, module, sub, _ in gen.DAEMONS:
        for a in gen._parser(module, sub)._actions:
            for opt in a.option_strings:
                if opt not in ("-h", "--help", "--version"):
                    assert f"`{opt}`" in text, (module, opt)


def _nginx() -> str:
    exe = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if exe is None:
        pytest.skip("nginx missing: install Debian's nginx-light (in the Makefile's APT_PACKAGES)")
    return exe


def _nginx_main_conf(tmp_path: Path, site: str) -> Path:
    cert, key = self_signed_cert("discovery.example.net")
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    site = site.replace("/etc/nginx/tls/discovery.crt", str(tmp_path / "tls.crt"))
    site = site.replace("/etc/nginx/tls/discovery.key", str(tmp_path / "tls.key"))
    (tmp_path / "site.conf").write_text(site)
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log;\n"
        "events {}\n"
        "http {\n"
        f"    access_log {tmp_path}/access.log;\n"
        f"    client_body_temp_path {tmp_path}/body;\n"
        f"    proxy_temp_path {tmp_path}/proxy;\n"
        f"    include {tmp_path}/site.conf;\n"
        "}\n"
    )
    return main


def test_nginx_config_passes_nginx_t(tmp_path: Path):
    exe = _nginx()
    main = _nginx_main_conf(tmp_path, NGINX_CONF.read_text())
    r = subprocess.run(
        [exe, "-t", "-p", str(tmp_path), "-c", str(main)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr


def test_nginx_t_catches_mistakes(tmp_path: Path):
    exe = _nginx()
    main = _nginx_main_conf(tmp_path, NGINX_CONF.read_text().replace("grpc_pass ", "grpc_passs "))
    r = subprocess.run(
        [exe, "-t", "-p", str(tmp_path), "-c", str(main)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "grpc_passs" in r.stderr


def test_nginx_config_passes_client_address_to_a_trusted_registry():
    text = NGINX_CONF.read_text()
    assert "grpc_set_header X-Real-IP $remote_addr;" in text
    assert "--trusted-proxy 127.0.0.1/32" in text
    assert re.search(r"grpc_read_timeout\s+1h;", text)


def _guides() -> list[Path]:
    return sorted([*DOCS.glob("*.md"), *(DOCS / "design").glob("*.md")])


def test_docs_links_point_at_existing_files():
    for doc in [*_guides(), ROOT / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_docs_yaml_snippets_parse():
    n = 0
    for doc in _guides():
        for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S):
            list(yaml.safe_load_all(block))
            n += 1
    assert n > 0


def test_operator_guide_talos_snippet():
    text = (DOCS / "operator-guide.md").read_text()
    blocks = [list(yaml.safe_load_all(b)) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    docs = [d for b in blocks for d in b if isinstance(d, dict)]
    machine = next(d for d in docs if "cluster" in d and "discovery" in d["cluster"])
    svc = machine["cluster"]["discovery"]["registries"]["service"]
    assert svc["endpoint"].startswith("https://")
    assert machine["cluster"]["discovery"]["enabled"] is True
    assert any(d.get("kind") == "DiscoveryServiceConfig" for d in docs)


def test_guide_metric_names_exist(tmp_path: Path):
    """Every registry metric the guide's alerts use is exported (with its _total suffix for counters):
    the service's, the embedded store's (journal failures), the etcd store's, the certificate's."""
    from prometheus_client import generate_latest

    from discovery.server.etcdstore import StoreMetrics
    from discovery.server.main import StorageMetrics
    from discovery.server.obsmetrics import CertificateExpiry, JournalFailures
    from discovery.server.service import Metrics
    from discovery.server.storage import Store

    m = Metrics()
    m.storage_ops.labels("save", "error")
    StorageMetrics(m)
    JournalFailures(Store(tmp_path / "state.binpb"), m.registry)
    (tmp_path / "tls.crt").write_bytes(self_signed_cert()[0])
    CertificateExpiry(tmp_path / "tls.crt", m.registry)
    StoreMetrics(m.registry)
    exported = generate_latest(m.registry).decode()
    used = set(re.findall(r"\b(discovery_[a-z_]+)", (DOCS / "operator-guide.md").read_text()))
    assert used
    for name in used:
        assert re.search(rf"^{name}[{{ ]", exported, re.M), f"{name} is not exported"


def test_design_notes_are_listed_and_their_code_exists():
    index = (DOCS / "design" / "README.md").read_text()
    notes = {p.name for p in (DOCS / "design").glob("*.md")} - {"README.md"}
    listed = set(re.findall(r"\]\(([\w.-]+\.md)\)", index))
    assert listed == notes, f"unlisted: {sorted(notes - listed)}, missing: {sorted(listed - notes)}"
    for code in re.findall(r"\| `([\w/.]+)`", index):
        assert (ROOT / code).exists(), code
    for link in re.findall(r"\]\(([\w.-]+\.md)\)", index):
        assert (DOCS / "design" / link).is_file(), link

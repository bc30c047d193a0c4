"""deploy/observability: the alert rules pass ``promtool check rules`` and their unit tests
(``promtool test rules``), the dashboards are valid Grafana JSON whose queries promtool parses, and every
metric name a rule or a dashboard query selects is one our daemons export: scraped from a real
discovery-service (TLS, file store, STUN; an etcd replica for the etcd store's series) and from real
``kubespan run`` agents in network namespaces (root; one with ``--relay``).

machined exports the same collectors as ``kubespan run`` (kubespan.metrics) and none of its own.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from discovery.client.client import DiscoveryClient
from discovery.testing import ServerProcess, etcd_store_flags, self_signed_cert
from netns.mesh import STATUS_PORT, lan_pair, stop_agents
from spanapi.discovery.client import affiliate_pb2
from spanutil.etcdlab import EtcdLab, etcd_binary

OBS = Path(__file__).resolve().parents[2] / "deploy" / "observability"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
NO_PROMTOOL = "promtool is not installed (Debian: prometheus, which `make sysdeps` installs)"
# Series Prometheus makes itself, not the daemons.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Grafana's variables, replaced by values PromQL accepts.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
KEYWORDS |= {"offset", "atan2", "inf", "nan", "start", "end"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.skip(NO_PROMTOOL)
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=OBS)


# ---------------------------------------------------------------- expressions and names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label names, grouping labels,
    durations and numbers are not names)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", "{}", s)
    s = re.sub(r"\[[^\]]*\]", "[]", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word, before = m.group(0), s[: m.start()]
        if word.lower() in KEYWORDS or s[m.end() :].lstrip().startswith("("):
            continue
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # 1e3, 0x1f, 5m
        names.add(word)
    return names


def test_metric_names_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket{job="a",'
        ' grpc_type=~"unary|x"}[5m]))) / on (instance) group_left(peer) kubespan_ready offset 5m'
        " + (count(up == 0) or vector(0)) - time() < 14 * 86400 and bool x_total > 1e3"
    )
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket", "kubespan_ready", "up", "x_total"}


def rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load((OBS / "alerts.yml").read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((OBS / "grafana").glob("*.json"))}


def dashboard_exprs(board: dict[str, Any]) -> dict[str, str]:
    """Every query of a dashboard (panel targets and query variables), Grafana variables replaced."""
    out: dict[str, str] = {}
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            out[f"{panel['title']} / {t['refId']}"] = t["expr"]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*[A-Za-z_]\w*\)", q)
            assert m, f"variable {var['name']}: not label_values(SELECTOR, LABEL): {q}"
            out[f"variable {var['name']}"] = m.group(1)  # the selector (label_values is Grafana's)
    for k, v in out.items():
        for var, value in GRAFANA_VARS.items():
            v = v.replace(var, value)
        out[k] = v
    return out


def all_exprs() -> dict[str, str]:
    out = {f"alerts.yml: {k}": v for k, v in rule_exprs().items()}
    for name, board in dashboards().items():
        out.update({f"{name}: {k}": v for k, v in dashboard_exprs(board).items()})
    return out


# ---------------------------------------------------------------- promtool


def test_alert_rules_pass_promtool_check() -> None:
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in r.stdout


def test_alert_rules_unit_tests_pass_and_cover_every_alert() -> None:
    r = promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    tests = yaml.safe_load((OBS / "alerts_test.yml").read_text())["tests"]
    fired = {a["alertname"] for t in tests for a in t["alert_rule_test"] if a.get("exp_alerts")}
    quiet = {a["alertname"] for t in tests for a in t["alert_rule_test"] if not a.get("exp_alerts")}
    assert fired == set(rule_exprs()), set(rule_exprs()) ^ fired
    assert quiet >= set(rule_exprs()) - {
        "DiscoveryCertificateExpiresSoon",
        "DiscoveryCertificateExpiresVerySoon",
    }


def test_alert_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    # The unit tests must be able to fail: drop PeerDown's `for: 2m` and they do.
    text = (OBS / "alerts.yml").read_text()
    broken = text.replace(
        "expr: kubespan_peer_state == 2\n        for: 2m\n", "expr: kubespan_peer_state == 2\n", 1
    )
    assert broken != text
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(OBS / "alerts_test.yml", tmp_path / "alerts_test.yml")
    if not Path(PROMTOOL).exists():
        pytest.skip(NO_PROMTOOL)
    r = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert r.returncode != 0 and "KubeSpanPeerDown" in r.stdout + r.stderr


def test_example_prometheus_config_passes_promtool() -> None:
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboards_are_grafana_json_with_queries_promtool_parses(tmp_path: Path) -> None:
    boards = dashboards()
    assert set(boards) == {"mesh.json", "registry.json"}
    rules = []
    for name, board in boards.items():
        assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        for expr in dashboard_exprs(board).values():
            rules.append({"record": f"dashboard:check:{len(rules)}", "expr": expr})
    (tmp_path / "dash.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    if not Path(PROMTOOL).exists():
        pytest.skip(NO_PROMTOOL)
    r = subprocess.run(
        [PROMTOOL, "check", "rules", str(tmp_path / "dash.yml")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- what the daemons export


def exported_names(text: str) -> set[str]:
    """Series names an exposition allows: sample names, and for each ``# TYPE`` the names its type
    produces (a family without samples still has its TYPE line)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            base = name.removesuffix("_total")
            if kind == "counter":
                names |= {base + "_total", base + "_created"}
            elif kind in ("histogram", "summary"):
                names |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def wanted(prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    """Metric name -> the expressions using it, for names with one of ``prefixes``."""
    out: dict[str, set[str]] = {}
    for where, expr in all_exprs().items():
        for name in metric_names(expr) - SYNTHETIC:
            if name.startswith(prefixes):
                out.setdefault(name, set()).add(where)
    return out


def test_every_query_uses_a_known_daemon() -> None:
    # Anything not from the agent, the registry (incl. its gRPC and process series) or Prometheus.
    prefixes = ("kubespan_", "discovery_", "grpc_server_", "process_")
    stray = {
        where: sorted(n for n in metric_names(expr) - SYNTHETIC if not n.startswith(prefixes))
        for where, expr in all_exprs().items()
    }
    assert {k: v for k, v in stray.items() if v} == {}


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


@pytest.fixture
def registry_exposition(tmp_path: Path) -> Iterator[str]:
    """/metrics of real discovery-service processes after real clients used them: one with TLS, a file
    store and STUN; one on etcd (when installed) for the etcd store's series."""
    cert, key = self_signed_cert("localhost")
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    tls_flags = ("--certificate-path", str(tmp_path / "tls.crt"), "--key-path", str(tmp_path / "tls.key"))
    texts = []
    with ServerProcess(tmp_path / "a", *tls_flags, "--stun-addr", "127.0.0.1:0", "--no-rpc-log") as tls:
        with ServerProcess(tmp_path / "b", "--no-rpc-log") as plain:
            import asyncio

            async def use() -> None:
                async with DiscoveryClient(
                    [f"http://{plain.target}"], cluster_id="obs", secret=bytes(32), affiliate_id="n1"
                ) as c:
                    await c.set_local_data(affiliate_pb2.Affiliate(node_id="n1"))
                    assert await asyncio.wait_for(c.wait_connected(), 10)

            asyncio.run(use())
            texts += [
                tls.http_get("metrics", "/metrics").decode(),
                plain.http_get("metrics", "/metrics").decode(),
            ]
    if etcd_binary() is not None:
        with EtcdLab(tmp_path / "etcd", 1) as etcd:
            with ServerProcess(None, *etcd_store_flags(etcd.endpoints), "--no-rpc-log") as replica:
                texts.append(replica.http_get("metrics", "/metrics").decode())
    yield "\n".join(texts)


def test_registry_queries_use_exported_metrics(registry_exposition: str) -> None:
    have = exported_names(registry_exposition)
    want = wanted(("discovery_", "grpc_server_", "process_"))
    assert want, "no registry metric in any query"
    if etcd_binary() is None:
        want = {n: w for n, w in want.items() if not n.startswith("discovery_store_")}
    missing = {n: sorted(w) for n, w in want.items() if n not in have}
    assert missing == {}, f"queries use metrics discovery-service does not export: {missing}"


@pytest.mark.root
def test_mesh_queries_use_exported_metrics() -> None:
    lab, _, nodes = lan_pair("10.60.0", (("--relay",), ()))
    try:
        texts = []
        for mn in nodes:
            code, body = mn.node.http_get("127.0.0.1", STATUS_PORT, "/metrics")
            assert code == 200
            texts.append(body.decode())
    finally:
        stop_agents(lab)
        lab.__exit__(None, None, None)
    have = exported_names("\n".join(texts))
    want = wanted(("kubespan_",))
    assert want, "no mesh metric in any query"
    missing = {n: sorted(w) for n, w in want.items() if n not in have}
    assert missing == {}, f"queries use metrics kubespan run does not export: {missing}"

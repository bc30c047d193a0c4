"""spanctl's client config (talosconfig format): parsing, lookup order, writing, merging."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from machined.spanctl.client import ConnectionSetupError, Target, socket_path, tcp_target
from machined.spanctl.config import ClientConfig, ConfigError, Context, default_path, write_private


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


CA = b64("-----BEGIN CERTIFICATE-----\nCA\n")
CRT = b64("-----BEGIN CERTIFICATE-----\nCRT\n")
KEY = b64("-----BEGIN EC PRIVATE KEY-----\nKEY\n")

TALOSCONFIG = f"""
context: prod
contexts:
  prod:
    endpoints: [192.0.2.10, 192.0.2.11]
    nodes: [10.0.0.1, 10.0.0.2]
    ca: {CA}
    crt: {CRT}
    key: {KEY}
  lab:
    endpoints: [unix:///run/machined/machine.sock]
"""


def test_parse_talosconfig_decodes_base64_pem() -> None:
    cfg = ClientConfig.parse(TALOSCONFIG)
    name, ctx = cfg.current()
    assert name == "prod"
    assert ctx.endpoints == ["192.0.2.10", "192.0.2.11"]
    assert ctx.nodes == ["10.0.0.1", "10.0.0.2"]
    assert ctx.ca.startswith(b"-----BEGIN CERTIFICATE-----")
    assert ctx.key.endswith(b"KEY\n")
    assert cfg.current("lab")[1].nodes == []


def test_round_trip_keeps_contexts() -> None:
    cfg = ClientConfig.parse(TALOSCONFIG)
    again = ClientConfig.parse(cfg.to_yaml())
    assert again == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("context: x\ncontexts: {}\n", 'context "x" is not defined'),
        ("contexts: {a: {ca: '!!notbase64'}}\n", "contexts.a.ca: not valid base64"),
        ("contexts: {a: {endpoints: [1, 2]}}\n", "contexts.a.endpoints: must be a list of strings"),
        ("- a\n", "must be a mapping"),
        ("contexts: [\n", "not valid YAML"),
    ],
)
def test_invalid_configs_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClientConfig.parse(text)


def test_unknown_context_is_an_error() -> None:
    with pytest.raises(ConfigError, match='context "nope" is not defined'):
        ClientConfig.parse(TALOSCONFIG).current("nope")


def test_lookup_order_flag_env_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("SPANCTL_CONFIG", "TALOSCONFIG", "TALOS_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert default_path(None) == tmp_path / ".spanctl" / "config"
    monkeypatch.setenv("SPANCTL_CONFIG", str(tmp_path / "env"))
    assert default_path(None) == tmp_path / "env"
    assert default_path(str(tmp_path / "flag")) == tmp_path / "flag"


def test_missing_file_is_an_empty_config(tmp_path: Path) -> None:
    assert ClientConfig.load(tmp_path / "none") == ClientConfig()
    with pytest.raises(ConfigError, match="does not exist"):
        ClientConfig.load(tmp_path / "none", missing_ok=False)


def test_write_private_is_0600(tmp_path: Path) -> None:
    p = tmp_path / "d" / "config"
    write_private(p, "context: ''\n")
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert p.read_text() == "context: ''\n"
    assert [x.name for x in p.parent.iterdir()] == ["config"]


def test_merge_renames_clashing_contexts() -> None:
    cfg = ClientConfig.parse(TALOSCONFIG)
    other = ClientConfig("prod", {"prod": Context(endpoints=["198.51.100.1"])})
    assert cfg.merge(other) == "prod-1"
    assert cfg.context == "prod-1"
    assert cfg.contexts["prod-1"].endpoints == ["198.51.100.1"]
    assert cfg.contexts["prod"].endpoints == ["192.0.2.10", "192.0.2.11"]


def test_target_from_context_and_flags() -> None:
    cfg = ClientConfig.parse(TALOSCONFIG)
    t = Target.from_args(cfg)
    assert (t.endpoint, t.nodes, t.direct) == ("192.0.2.10", ["10.0.0.1", "10.0.0.2"], False)
    assert t.fanout_metadata() == [("nodes", "10.0.0.1"), ("nodes", "10.0.0.2")]
    assert t.node_metadata("10.0.0.2") == [("node", "10.0.0.2")]
    t = Target.from_args(cfg, endpoints=["203.0.113.5"], nodes=["n9"])
    assert (t.endpoint, t.nodes) == ("203.0.113.5", ["n9"])
    lab = Target.from_args(cfg, context="lab")
    assert lab.direct and lab.socket == "/run/machined/machine.sock"
    assert lab.fanout_metadata() == [] and lab.node_metadata("x") == []


def test_socket_reaches_one_node_only() -> None:
    t = Target.from_args(ClientConfig(), socket="/tmp/m.sock", nodes=["a", "b"])
    with pytest.raises(ConnectionSetupError, match="one machined"):
        t.check()


def test_no_endpoint_and_no_certificates_are_clear_errors() -> None:
    with pytest.raises(ConnectionSetupError, match="no endpoint"):
        Target.from_args(ClientConfig())
    t = Target.from_args(ClientConfig(), endpoints=["192.0.2.1"])
    with pytest.raises(ConnectionSetupError, match="no ca, crt, key"):
        t.channel()


@pytest.mark.parametrize(
    ("endpoint", "target"),
    [
        ("192.0.2.1", "192.0.2.1:50000"),
        ("192.0.2.1:50001", "192.0.2.1:50001"),
        ("fd00::1", "[fd00::1]:50000"),
        ("[fd00::1]", "[fd00::1]:50000"),
        ("[fd00::1]:7", "[fd00::1]:7"),
        ("node.example", "node.example:50000"),
    ],
)
def test_tcp_targets(endpoint: str, target: str) -> None:
    assert tcp_target(endpoint) == target


def test_socket_endpoints() -> None:
    assert socket_path("unix:///run/m.sock") == "/run/m.sock"
    assert socket_path("unix:/run/m.sock") == "/run/m.sock"
    assert socket_path("192.0.2.1") is None

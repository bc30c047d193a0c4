"""Loading and validating machine configs: every problem names document, field path and rule, all problems
are collected, and no secret value ever appears in a message."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from machined.config import (
    DEFAULT_DISCOVERY_ENDPOINT,
    ConfigValidationError,
    HealthCheck,
    MachineConfig,
    MeshRequirement,
)
from machined.config.redact import secret_values
from machined.config.testing import config_yaml, new_secret
from machined.config.yamlio import dump_documents, load_documents

SECRET = new_secret()
ETCD = {
    "name": "etcd",
    "command": "/usr/bin/etcd",
    "args": ["--name", "n1"],
    "env": {"ETCD_LOG_LEVEL": "info", "ETCD_ROOT_PASSWORD": "s3cr3t-env-value"},
    "restart": "on-failure",
    "requiresMesh": {"quorum": 1},
    "healthCheck": {"http": "http://127.0.0.1:2379/health", "interval": "2s", "timeout": "500ms"},
}
APP = {"name": "app", "command": "/usr/bin/app", "dependsOn": ["etcd"], "requiresMesh": "ready"}


def base_docs(**kw: Any) -> list[dict[str, Any]]:
    kw.setdefault("secret", SECRET)
    kw.setdefault("services", [APP, ETCD])
    kw.setdefault("agent", {"stateDir": "/var/lib/machined-test"})
    return load_documents(config_yaml(**kw))


def doc(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    for d in docs:
        if d.get("kind", "v1alpha1" if "version" in d else None) == kind and (
            name is None or d.get("name") == name
        ):
            return d
    raise KeyError(kind)


def all_secrets(docs: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for d in docs:
        out += secret_values(d.get("kind", "v1alpha1"), d)
    return [s for s in out if len(s) >= 4]


# --- a valid config and its derived views -----------------------------------------------------------


def test_valid_config_derived_views():
    cfg = MachineConfig.from_documents(base_docs())
    assert cfg.warnings == ()
    mesh = cfg.mesh()
    assert mesh.enabled
    assert mesh.cluster_id == "test-cluster"
    assert mesh.cluster_secret == base64.b64decode(SECRET)
    assert mesh.discovery_urls == ("http://127.0.0.1:3000",)
    assert mesh.state_dir == Path("/var/lib/machined-test")
    # dependencies first, then document order
    assert [s.name for s in cfg.services()] == ["etcd", "app"]
    etcd = cfg.service("etcd")
    assert etcd is not None
    assert etcd.argv == ("/usr/bin/etcd", "--name", "n1")
    assert etcd.environ["ETCD_LOG_LEVEL"] == "info"
    assert etcd.restart == "on-failure"
    assert etcd.requires_mesh == MeshRequirement("quorum", 1)
    assert etcd.health_check == HealthCheck(
        "http", url="http://127.0.0.1:2379/health", interval=2.0, timeout=0.5
    )
    assert cfg.service("app").requires_mesh.mode == "ready"  # type: ignore[union-attr]
    opts = cfg.mesh_options("host-a")
    assert opts.nodename == "host-a" and opts.cluster_secret == mesh.cluster_secret
    assert opts.machine_type == cfg.v1alpha1.machine_type != ""  # published in the affiliate


def test_reprs_never_show_secrets():
    docs = base_docs()
    cfg = MachineConfig.from_documents(docs)
    shown = " ".join(map(repr, [cfg, cfg.mesh(), cfg.v1alpha1, *cfg.services()]))
    assert SECRET not in shown and "s3cr3t-env-value" not in shown
    assert repr(base64.b64decode(SECRET)) not in shown
    assert "s3cr3t-env-value" not in cfg.redacted_yaml() and SECRET not in cfg.redacted_yaml()


def test_mesh_requirement_semantics():
    assert MeshRequirement().satisfied(ready=False, peers_up=0)
    assert not MeshRequirement("ready").satisfied(ready=False, peers_up=5)
    assert MeshRequirement("quorum", 2).satisfied(ready=False, peers_up=2)
    assert not MeshRequirement("quorum", 2).satisfied(ready=True, peers_up=1)


def test_agent_config_full():
    agent = {
        "stateDir": "/srv/m",
        "nodename": "n1",
        "httpStatusAddr": "[::1]:9000",
        "wireguard": {
            "backend": "userspace",
            "wireguardGo": "/opt/wireguard-go",
            "socketDir": "/run/wg",
            "linkName": "ks0",
            "listenPort": 51999,
            "persistentKeepalive": 0,
        },
        "routing": {
            "table": 181,
            "rulePriority": 32000,
            "fwmarkWireguard": 0x100,
            "fwmarkForce": 0x200,
            "fwmarkMask": 0x300,
            "nftTable": "ks_t",
            "steering": "routes",
        },
        "mesh": {
            "advertisedNetworks": ["10.10.0.0/24", "fd00::/64"],
            "mac": "52:54:00:12:34:56",
            "stunServers": ["stun.example.net:3478", "[2001:db8::1]:3479"],
        },
        "discovery": {"caFile": "/etc/m/ca.pem"},
    }
    # an unquoted MAC would be a base-60 number in YAML 1.1; our loader keeps it a string
    text = config_yaml(secret=SECRET, agent=agent).replace(
        "mac: '52:54:00:12:34:56'", "mac: 52:54:00:12:34:56"
    )
    assert "mac: 52:54:00:12:34:56" in text
    cfg = MachineConfig.parse(text)
    a, m = cfg.agent, cfg.mesh()
    assert a.http_status_addr == ("::1", 9000)
    assert (
        m.backend == "userspace" and m.wireguard_go == "/opt/wireguard-go" and m.socket_dir == Path("/run/wg")
    )
    assert (
        m.config.link_name == "ks0" and m.config.listen_port == 51999 and m.config.persistent_keepalive == 0
    )
    assert (m.config.routing_table, m.config.rule_priority, m.config.nft_table) == (181, 32000, "ks_t")
    assert m.config.steering == "routes"
    assert (m.config.fwmark_wireguard, m.config.fwmark_force, m.config.fwmark_mask) == (0x100, 0x200, 0x300)
    assert m.advertise == (ipaddress.ip_network("10.10.0.0/24"), ipaddress.ip_network("fd00::/64"))
    assert m.mac == bytes.fromhex("525400123456")
    assert m.discovery_ca == Path("/etc/m/ca.pem")
    assert m.nodename == "n1"
    assert m.stun_servers == (("stun.example.net", 3478), ("2001:db8::1", 3479))
    assert m.options("h").stun_servers == m.stun_servers


def test_empty_http_status_addr_disables_it():
    cfg = MachineConfig.from_documents(base_docs(agent={"httpStatusAddr": ""}))
    assert cfg.agent.http_status_addr is None


# --- discovery ---------------------------------------------------------------------------------------


def test_legacy_discovery_defaults_to_talos_endpoint():
    docs = base_docs(discovery=())
    doc(docs, "v1alpha1")["cluster"]["discovery"] = {"enabled": True}
    cfg = MachineConfig.from_documents(docs)
    assert [(e.name, e.url) for e in cfg.discovery_endpoints] == [("legacy", DEFAULT_DISCOVERY_ENDPOINT)]


def test_legacy_discovery_endpoint_and_disabled_registry():
    # the legacy block alone (with DiscoveryServiceConfig documents it is refused, as Talos does)
    docs = base_docs(discovery=(), kubespan=False, services=[])
    v1 = doc(docs, "v1alpha1")
    v1["cluster"]["discovery"] = {
        "enabled": True,
        "registries": {"service": {"endpoint": "https://d.example:443/"}},
    }
    cfg = MachineConfig.from_documents(docs)
    assert [(e.name, e.url) for e in cfg.mesh().discovery] == [("legacy", "https://d.example:443/")]
    v1["cluster"]["discovery"]["registries"]["service"]["disabled"] = True
    assert MachineConfig.from_documents(docs).mesh().discovery_urls == ()


def test_duplicate_discovery_url_is_registered_once_with_a_warning():
    cfg = MachineConfig.from_documents(base_docs(discovery=("http://a:1", "http://a:1")))
    assert cfg.mesh().discovery_urls == ("http://a:1",)
    assert any("listed twice" in str(w) for w in cfg.warnings)


def test_discovery_off_and_kubespan_off_needs_no_cluster_secret():
    docs = base_docs(discovery=(), kubespan=False, services=[])
    del doc(docs, "v1alpha1")["cluster"]["secret"]
    cfg = MachineConfig.from_documents(docs)
    assert not cfg.mesh().enabled and cfg.mesh().discovery == ()


# --- every rule names document, path and rule, and leaks nothing -------------------------------------


def _set(path: str, value: Any, kind: str = "v1alpha1", name: str | None = None):
    def mutate(docs: list[dict[str, Any]]) -> None:
        node = doc(docs, kind, name)
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is _DEL:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value

    return mutate


_DEL = object()
_BAD_B64 = base64.b64encode(b"only-sixteen-byt").decode()

CASES = [
    # v1alpha1
    (_set("cluster.secret", _BAD_B64), "v1alpha1.cluster.secret", "must be base64 of 32 bytes"),
    (
        _set("cluster.secret", "!!not base64 at all!!"),
        "v1alpha1.cluster.secret",
        "must be base64 of 32 bytes",
    ),
    (_set("cluster.secret", _DEL), "v1alpha1.cluster.secret", "is required: KubeSpan is enabled"),
    (_set("cluster.id", _DEL), "v1alpha1.cluster.id", "is required"),
    (_set("cluster.id", "x" * 257), "v1alpha1.cluster.id", "must be 1..256 bytes"),
    (_set("machine.type", "router"), "v1alpha1.machine.type", "must be one of controlplane, worker"),
    (_set("machine.type", _DEL), "v1alpha1.machine.type", "is required"),
    (_set("machine.token", "abc.def"), "v1alpha1.machine.token", "[a-z0-9]{6}.[a-z0-9]{16}"),
    (
        _set("machine.ca", {"crt": "bm90IGEgY2VydA==", "key": _BAD_B64}),
        "v1alpha1.machine.ca.crt",
        "must be base64 of a PEM certificate",
    ),
    (_set("machine.ca", {"key": _BAD_B64}), "v1alpha1.machine.ca.crt", "is required"),
    (
        _set("machine.certSANs", ["ok.example", "bad name!"]),
        "v1alpha1.machine.certSANs[1]",
        "must be an IP address or a DNS name",
    ),
    (_set("machine.network", "eth0"), "v1alpha1.machine.network", "must be a mapping"),
    (
        _set("cluster.discovery.enabled", "yes please"),
        "v1alpha1.cluster.discovery.enabled",
        "must be true or false",
    ),
    (
        _set("cluster.discovery", {"enabled": True, "registries": {"service": {"endpoint": "ftp://x/"}}}),
        "v1alpha1.cluster.discovery.registries.service.endpoint",
        "must be a discovery endpoint URL",
    ),
    (_set("version", "v1alpha2"), "v1alpha1.version", "must be v1alpha1"),
    # KubeSpanConfig
    (_set("mtu", 1000, "KubeSpanConfig"), "KubeSpanConfig.mtu", "must be between 1280 and"),
    (_set("enabled", "true", "KubeSpanConfig"), "KubeSpanConfig.enabled", "must be true or false"),
    (
        _set("filters", {"endpoints": ["10.0.0.0/8", "!nonsense"]}, "KubeSpanConfig"),
        "KubeSpanConfig.filters.endpoints[1]",
        "must be a CIDR or IP address",
    ),
    (
        _set("filters", {"excludeAdvertisedNetworks": ["10.0.0.0/33"]}, "KubeSpanConfig"),
        "KubeSpanConfig.filters.excludeAdvertisedNetworks[0]",
        "must be a CIDR",
    ),
    (_set("apiVersion", "v2", "KubeSpanConfig"), "KubeSpanConfig.apiVersion", "must be v1alpha1"),
    # DiscoveryServiceConfig
    (
        _set("endpoint", "ftp://d.example/", "DiscoveryServiceConfig"),
        "DiscoveryServiceConfig[ds0].endpoint",
        "must be a discovery endpoint URL",
    ),
    (_set("endpoint", _DEL, "DiscoveryServiceConfig"), "DiscoveryServiceConfig[ds0].endpoint", "is required"),
    # AgentConfig
    (_set("stateDir", "relative/dir", "AgentConfig"), "AgentConfig.stateDir", "must be an absolute path"),
    (
        _set("wireguard", {"backend": "ebpf"}, "AgentConfig"),
        "AgentConfig.wireguard.backend",
        "must be one of auto, kernel, userspace",
    ),
    (
        _set("wireguard", {"listenPort": 70000}, "AgentConfig"),
        "AgentConfig.wireguard.listenPort",
        "must be between 1 and 65535",
    ),
    (
        _set("wireguard", {"linkName": "a-very-long-link-name"}, "AgentConfig"),
        "AgentConfig.wireguard.linkName",
        "1..15 characters",
    ),
    (
        _set("wireguard", {"linkName": "ks\u00e9"}, "AgentConfig"),
        "AgentConfig.wireguard.linkName",
        "printable ASCII",
    ),
    (_set("routing", {"table": 254}, "AgentConfig"), "AgentConfig.routing.table", "reserved"),
    (
        _set("routing", {"fwmarkForce": 0x20}, "AgentConfig"),
        "AgentConfig.routing.fwmarkForce",
        "must differ from fwmark_wireguard",
    ),
    (
        _set("routing", {"fwmarkForce": 0x80}, "AgentConfig"),
        "AgentConfig.routing.fwmarkForce",
        "outside fwmark_mask",
    ),
    (_set("mesh", {"mac": "zz:zz"}, "AgentConfig"), "AgentConfig.mesh.mac", "must be a MAC address"),
    (
        _set("mesh", {"stunServers": ["stun.example.net"]}, "AgentConfig"),
        "AgentConfig.mesh.stunServers[0]",
        "must be HOST:PORT",
    ),
    (
        _set("mesh", {"stunServers": ["stun.example.net:70000"]}, "AgentConfig"),
        "AgentConfig.mesh.stunServers[0]",
        "'stun.example.net:70000': port 70000 out of range",
    ),
    (
        _set("mesh", {"advertisedNetworks": ["10.1.0.0/16", 5]}, "AgentConfig"),
        "AgentConfig.mesh.advertisedNetworks[1]",
        "must be a CIDR",
    ),
    (_set("httpStatusAddr", "nohostport", "AgentConfig"), "AgentConfig.httpStatusAddr", "must be HOST:PORT"),
    (
        _set("httpStatusAddr", "127.0.0.1:http", "AgentConfig"),
        "AgentConfig.httpStatusAddr",
        "got '127.0.0.1:http': port 'http' is not a number",
    ),
    (
        _set("stateDirectory", "/x", "AgentConfig"),
        "AgentConfig.stateDirectory",
        "unknown field (did you mean 'stateDir'?)",
    ),
    (
        _set("wireguard", {"listen_port": 1}, "AgentConfig"),
        "AgentConfig.wireguard.listen_port",
        "unknown field",
    ),
    # ServiceConfig
    (
        _set("restart", "sometimes", "ServiceConfig", "etcd"),
        "ServiceConfig[etcd].restart",
        "must be one of always, on-failure, never",
    ),
    (_set("command", _DEL, "ServiceConfig", "etcd"), "ServiceConfig[etcd].command", "is required"),
    (
        _set("args", "--name n1", "ServiceConfig", "etcd"),
        "ServiceConfig[etcd].args",
        "must be a list of strings",
    ),
    (
        _set("dependsOn", ["nope"], "ServiceConfig", "app"),
        "ServiceConfig[app].dependsOn",
        "'nope', which is not a ServiceConfig",
    ),
    (
        _set("dependsOn", ["app"], "ServiceConfig", "app"),
        "ServiceConfig[app].dependsOn",
        "must not name the service itself",
    ),
    (
        _set("dependsOn", ["app"], "ServiceConfig", "etcd"),
        "ServiceConfig[app].dependsOn",
        "dependency cycle: app -> etcd -> app",
    ),
    (
        _set("requiresMesh", "always", "ServiceConfig", "app"),
        "ServiceConfig[app].requiresMesh",
        "must be none, ready, or {quorum: N}",
    ),
    (
        _set("requiresMesh", {"quorum": 0}, "ServiceConfig", "app"),
        "ServiceConfig[app].requiresMesh.quorum",
        "must be between 1 and",
    ),
    (
        _set("requiresMesh", {"quorom": 2}, "ServiceConfig", "app"),
        "ServiceConfig[app].requiresMesh.quorom",
        "unknown field",
    ),
    (
        _set("healthCheck", {"tcp": "h:1", "http": "http://h/"}, "ServiceConfig", "app"),
        "ServiceConfig[app].healthCheck",
        "exactly one of exec, tcp or http",
    ),
    (
        _set("healthCheck", {"tcp": "no-port"}, "ServiceConfig", "app"),
        "ServiceConfig[app].healthCheck.tcp",
        "must be HOST:PORT, got 'no-port': no port",
    ),
    (
        _set("healthCheck", {"exec": []}, "ServiceConfig", "app"),
        "ServiceConfig[app].healthCheck.exec",
        "must be a non-empty list",
    ),
    (
        _set("healthCheck", {"interval": "1s"}, "ServiceConfig", "app"),
        "ServiceConfig[app].healthCheck",
        "exactly one of",
    ),
    (
        _set("healthCheck", {"http": "http://u:pw@h/"}, "ServiceConfig", "app"),
        "ServiceConfig[app].healthCheck.http",
        "must not contain credentials",
    ),
    (
        _set("healthCheck", {"http": "http://h/", "interval": "5 parsecs"}, "ServiceConfig", "app"),
        "ServiceConfig[app].healthCheck.interval",
        "must be a duration",
    ),
    (
        _set("healthCheck", {"http": "http://h/", "timeout": "0s"}, "ServiceConfig", "app"),
        "ServiceConfig[app].healthCheck.timeout",
        "greater than 0",
    ),
    (
        _set("stopTimeout", "-1s", "ServiceConfig", "app"),
        "ServiceConfig[app].stopTimeout",
        "must be a duration",
    ),
    (
        _set("backoff", {"initial": "10s", "max": "1s"}, "ServiceConfig", "app"),
        "ServiceConfig[app].backoff.max",
        "must be at least backoff.initial",
    ),
    (
        _set("backoff", {"factor": 0.5}, "ServiceConfig", "app"),
        "ServiceConfig[app].backoff.factor",
        "from 1 to 100",
    ),
    (
        _set("backoff", {"reset": "1s"}, "ServiceConfig", "app"),
        "ServiceConfig[app].backoff.reset",
        "unknown field (did you mean 'resetAfter'?)",
    ),
    (
        _set("dependsOn", ["etcd", "etcd"], "ServiceConfig", "app"),
        "ServiceConfig[app].dependsOn",
        "lists a service twice",
    ),
    (
        _set("onMeshDegraded", "panic", "ServiceConfig", "app"),
        "ServiceConfig[app].onMeshDegraded",
        "must be one of ignore, stop, restart",
    ),
    (_set("user", True, "ServiceConfig", "app"), "ServiceConfig[app].user", "must be a user name or uid"),
    (_set("logLines", 0, "ServiceConfig", "app"), "ServiceConfig[app].logLines", "must be between 1 and"),
    (
        _set("logFile", "app.log", "ServiceConfig", "app"),
        "ServiceConfig[app].logFile",
        "must be an absolute path",
    ),
    (
        _set("env", {"BAD-NAME": "v"}, "ServiceConfig", "etcd"),
        "ServiceConfig[etcd].env.BAD-NAME",
        "must be a variable name",
    ),
    (
        _set("env", {"TOKEN": ["s3cr3t-in-a-list"]}, "ServiceConfig", "etcd"),
        "ServiceConfig[etcd].env.TOKEN",
        "must be a string",
    ),
    (
        _set("env", {"FLAG": True}, "ServiceConfig", "etcd"),
        "ServiceConfig[etcd].env.FLAG",
        "must be a string (quote it)",
    ),
    (
        _set("workingDir", "rel", "ServiceConfig", "etcd"),
        "ServiceConfig[etcd].workingDir",
        "must be an absolute path",
    ),
    (_set("name", "machined", "ServiceConfig", "app"), "ServiceConfig[machined].name", "is reserved"),
    (
        _set("comand", "/bin/x", "ServiceConfig", "app"),
        "ServiceConfig[app].comand",
        "unknown field (did you mean 'command'?)",
    ),
]


@pytest.mark.parametrize(("mutate", "location", "rule"), CASES, ids=[c[1] + ":" + c[2][:20] for c in CASES])
def test_each_rule_names_document_field_and_rule(mutate, location, rule):
    docs = base_docs()
    mutate(docs)
    secrets = [*all_secrets(docs), SECRET]
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.from_documents(docs)
    matching = [p for p in e.value.problems if p.location == location]
    assert matching, f"no problem at {location}: {e.value}"
    assert any(rule in p.rule for p in matching), str(e.value)
    assert all(p.index >= 0 for p in matching)
    text = str(e.value)
    assert f"{location} (document " in text
    for s in secrets:
        assert s not in text


def test_credentials_in_a_discovery_url_are_not_echoed():
    docs = base_docs()
    doc(docs, "DiscoveryServiceConfig")["endpoint"] = "https://admin:pa55w0rd@d.example/"
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.from_documents(docs)
    (p,) = e.value.problems
    assert p.location == "DiscoveryServiceConfig[ds0].endpoint" and p.rule == "must not contain credentials"
    assert "pa55w0rd" not in str(e.value)


def test_kubespan_needs_discovery():
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.from_documents(base_docs(discovery=()))
    assert [p.location for p in e.value.problems] == ["v1alpha1.cluster.discovery.enabled"]
    assert "KubeSpan finds its peers through the discovery service" in str(e.value)


def test_requires_mesh_needs_kubespan():
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.from_documents(base_docs(kubespan=False))
    assert {p.location for p in e.value.problems} == {
        "ServiceConfig[app].requiresMesh",
        "ServiceConfig[etcd].requiresMesh",
    }


def test_all_problems_are_collected_in_one_error():
    docs = base_docs()
    _set("cluster.secret", _BAD_B64)(docs)
    _set("mtu", 1, "KubeSpanConfig")(docs)
    _set("restart", "x", "ServiceConfig", "etcd")(docs)
    _set("bogus", 1, "AgentConfig")(docs)
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.from_documents(docs)
    assert {p.location for p in e.value.problems} == {
        "v1alpha1.cluster.secret",
        "KubeSpanConfig.mtu",
        "ServiceConfig[etcd].restart",
        "AgentConfig.bogus",
    }
    assert str(e.value).startswith("invalid machine config (4 problems):")


def test_every_bad_mesh_value_is_listed_with_its_yaml_path_and_limit():
    docs = base_docs()
    _set("wireguard", {"listenPort": 70000, "linkName": "a/b", "persistentKeepalive": "25"}, "AgentConfig")(
        docs
    )
    _set("routing", {"table": 254, "nftTable": "bad-name"}, "AgentConfig")(docs)
    _set("mtu", 1000, "KubeSpanConfig")(docs)
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.from_documents(docs)
    rules = {p.location: p.rule for p in e.value.problems}
    assert set(rules) == {
        "AgentConfig.wireguard.listenPort",
        "AgentConfig.wireguard.linkName",
        "AgentConfig.wireguard.persistentKeepalive",
        "AgentConfig.routing.table",
        "AgentConfig.routing.nftTable",
        "KubeSpanConfig.mtu",
    }
    assert "above the maximum 65535" in rules["AgentConfig.wireguard.listenPort"]
    assert "must be an integer, got '25'" == rules["AgentConfig.wireguard.persistentKeepalive"]
    assert "below the minimum 1280" in rules["KubeSpanConfig.mtu"]
    assert "reserved" in rules["AgentConfig.routing.table"]


def test_mtu_in_the_v1alpha1_document_is_named_there():
    docs = base_docs()
    docs = [d for d in docs if d.get("kind") != "KubeSpanConfig"]
    _set("machine.network", {"kubespan": {"enabled": True, "mtu": 70000}})(docs)
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.from_documents(docs)
    assert [(p.location, "above the maximum" in p.rule) for p in e.value.problems] == [
        ("v1alpha1.machine.network.kubespan.mtu", True)
    ]


def test_the_mesh_config_is_validated_once(monkeypatch: pytest.MonkeyPatch):
    from kubespan.constants import MeshConfig
    from kubespan.dataplane.ruleset import RulesetParams

    checks: list[int] = []
    real = MeshConfig.__post_init__

    def counting(self: MeshConfig) -> None:
        checks.append(self.listen_port)
        real(self)

    monkeypatch.setattr(MeshConfig, "__post_init__", counting)
    cfg = MachineConfig.from_documents(base_docs(agent={"wireguard": {"listenPort": 51999}}))
    assert checks == [51999]  # the YAML values are checked once, where the config is built
    opts = cfg.mesh_options("host")  # MeshSettings -> MeshOptions carry the checked MeshConfig
    params = RulesetParams.from_config(opts.config)  # and the ruleset derives from it
    assert opts.config is cfg.mesh().config and params.mtu == opts.config.mtu
    assert checks == [51999]


def test_document_level_problems():
    v1 = {"version": "v1alpha1", "machine": {"type": "worker"}}
    cases = [
        ([], "config", "v1alpha1 document is required"),
        ([v1, ["a", "list"]], "document 2", "must be a mapping"),
        (
            [v1, {"foo": 1}],
            "document 2",
            "must have version: v1alpha1 (or machine:/cluster:), or apiVersion and kind",
        ),
        ([v1, {"apiVersion": "v1alpha1"}], "document 2.kind", "is required"),
        ([v1, {"kind": "AgentConfig"}], "AgentConfig.apiVersion", "is required"),
        (
            [v1, {"apiVersion": "v1alpha1", "kind": "ServiceConfig", "command": "/x"}],
            "ServiceConfig (document 2).name",
            "is required",
        ),
        (
            [v1, {"apiVersion": "v1alpha1", "kind": "ServiceConfig", "name": "Bad Name", "command": "/x"}],
            "ServiceConfig (document 2).name",
            "must be 1..63 characters",
        ),
        (
            [
                v1,
                {"apiVersion": "v1alpha1", "kind": "AgentConfig"},
                {"apiVersion": "v1alpha1", "kind": "AgentConfig"},
            ],
            "AgentConfig",
            "duplicates document 2",
        ),
        ([v1, v1], "v1alpha1", "duplicates document 1"),
    ]
    for docs, location, rule in cases:
        with pytest.raises(ConfigValidationError) as e:
            MachineConfig.from_documents(docs)
        assert any(p.location == location and rule in p.rule for p in e.value.problems), (
            location,
            str(e.value),
        )


def test_yaml_syntax_error_gives_position_but_not_the_line():
    text = config_yaml(secret=SECRET).replace(f"secret: {SECRET}", f"secret: {SECRET}\n  bad: [unclosed")
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.parse(text)
    msg = str(e.value)
    assert "YAML error at line" in msg and "column" in msg
    assert SECRET not in msg


def test_yaml_duplicate_keys_are_errors():
    text = config_yaml(secret=SECRET).replace(
        "    type: worker\n", "    type: worker\n    type: controlplane\n"
    )
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.parse(text)
    assert "duplicate key 'type'" in str(e.value)


def test_yaml_non_utf8_is_an_error():
    with pytest.raises(ConfigValidationError, match="UTF-8"):
        MachineConfig.parse(b"version: v1alpha1\nmachine: {type: \xff}\n")


def test_yaml_loader_keeps_ambiguous_scalars_as_strings():
    (d,) = load_documents("a: 2024-01-01\nb: 52:54:00:12:34:56\nc: 0x20\nd: 1.5\ne: true\nf: '1'\n")
    assert d == {"a": "2024-01-01", "b": "52:54:00:12:34:56", "c": 32, "d": 1.5, "e": True, "f": "1"}
    assert load_documents(dump_documents([d])) == [d]


def test_machine_type_init_is_accepted_as_controlplane_with_a_warning():
    docs = base_docs()
    doc(docs, "v1alpha1")["machine"]["type"] = "init"
    cfg = MachineConfig.from_documents(docs)
    assert cfg.v1alpha1.machine_type == "controlplane"
    assert any("deprecated" in str(w) for w in cfg.warnings)


def test_talos_typo_is_an_error_with_a_hint_and_a_warning_when_lenient():
    docs = base_docs()
    doc(docs, "KubeSpanConfig")["enabeld"] = True
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.from_documents(docs)
    (p,) = e.value.problems
    assert p.location == "KubeSpanConfig.enabeld"
    assert p.rule.startswith("unknown field (did you mean 'enabled'?)")
    cfg = MachineConfig.from_documents(docs, strict=False)
    (w,) = cfg.warnings
    assert w.paths == ("KubeSpanConfig.enabeld",)
    assert "unknown to Talos" in w.message


def test_advertise_kubernetes_networks_warns_it_has_no_effect():
    docs = base_docs()
    doc(docs, "KubeSpanConfig")["advertiseKubernetesNetworks"] = True
    cfg = MachineConfig.from_documents(docs)
    assert any("advertiseKubernetesNetworks has no effect" in str(w) for w in cfg.warnings)


def test_null_reads_as_absent():
    docs = base_docs()
    doc(docs, "AgentConfig")["wireguard"] = None
    doc(docs, "KubeSpanConfig")["mtu"] = None
    cfg = MachineConfig.from_documents(docs)
    assert cfg.mesh().config.mtu == 1420


def test_text_round_trip_and_equality():
    text = config_yaml(secret=SECRET, services=[ETCD])
    cfg = MachineConfig.parse("# a comment\n" + text)
    assert cfg.to_yaml().startswith("# a comment")  # the original text is what gets stored
    again = MachineConfig.parse(cfg.canonical_yaml())
    assert again == cfg
    assert MachineConfig.from_documents(cfg.documents()) == cfg
    docs = cfg.documents()
    docs[0]["machine"]["type"] = "controlplane"  # documents() hands out copies
    assert cfg.v1alpha1.machine_type == "worker"


# --- change effects ---------------------------------------------------------------------------------


def test_change_effects():
    a = MachineConfig.from_documents(base_docs())
    assert a.changes(a).empty
    docs = base_docs()
    doc(docs, "KubeSpanConfig")["mtu"] = 1380
    doc(docs, "ServiceConfig", "app")["args"] = ["-v"]
    doc(docs, "AgentConfig")["stateDir"] = "/elsewhere"
    docs = [d for d in docs if d.get("name") != "etcd"]
    doc(docs, "ServiceConfig", "app").pop("dependsOn")
    docs.append({"apiVersion": "v1alpha1", "kind": "ServiceConfig", "name": "new", "command": "/bin/new"})
    b = MachineConfig.from_documents(docs)
    fx = a.changes(b)
    assert fx.mesh_restart == ("config.mtu",) and not fx.mesh_cleanup
    assert (
        fx.services_added == ("new",) and fx.services_removed == ("etcd",) and fx.services_changed == ("app",)
    )
    assert fx.next_start == ("AgentConfig.stateDir",)
    assert "mesh restarts keeping kernel state (config.mtu)" in fx.describe()

    docs = base_docs()
    doc(docs, "v1alpha1")["cluster"]["secret"] = new_secret()
    doc(docs, "AgentConfig")["routing"] = {"table": 200}
    c = MachineConfig.from_documents(docs)
    fx = a.changes(c)
    assert set(fx.mesh_restart) == {"cluster_secret", "config.routing_table"} and fx.mesh_cleanup
    assert SECRET not in fx.describe()


# --- the supervisor's definitions ---------------------------------------------------------------------


def test_service_config_converts_to_the_supervisor_definition():
    sv = pytest.importorskip("machined.services.spec")
    full = {
        "name": "web",
        "command": "/usr/bin/web",
        "args": ["--port", "8080"],
        "env": {"MODE": "prod", "PORT": 8080},
        "workingDir": "/srv/web",
        "user": "www-data",
        "enabled": True,
        "restart": "never",
        "backoff": {"initial": "500ms", "factor": 3, "max": "20s", "resetAfter": "2m"},
        "stopTimeout": "3s",
        "dependsOn": ["etcd"],
        "requiresMesh": {"quorum": 2},
        "onMeshDegraded": "restart",
        "healthCheck": {"http": "https://127.0.0.1:8443/healthz", "tlsVerify": False, "initialDelay": 0},
        "logLines": 100,
        "logFile": "/var/log/web.log",
    }
    cfg = MachineConfig.from_documents(base_docs(services=[ETCD, full]))
    svc = cfg.service("web").to_service()  # type: ignore[union-attr]
    assert svc.name == "web" and svc.argv == ("/usr/bin/web", "--port", "8080")
    assert svc.env == {"MODE": "prod", "PORT": "8080"}
    assert svc.cwd == "/srv/web" and svc.user == "www-data"
    assert svc.restart is sv.RestartPolicy.NEVER
    assert (svc.backoff.initial, svc.backoff.factor, svc.backoff.max, svc.backoff.reset_after) == (
        0.5,
        3.0,
        20.0,
        120.0,
    )
    assert svc.stop_timeout == 3.0 and svc.depends_on == ("etcd",)
    assert svc.requires_mesh == sv.MeshRequirement(sv.MeshMode.QUORUM, 2)
    assert svc.on_mesh_degraded is sv.OnMeshDegraded.RESTART
    assert (
        svc.health.kind is sv.HealthKind.HTTP
        and svc.health.tls_verify is False
        and svc.health.initial_delay == 0
    )
    assert svc.log_lines == 100 and svc.log_file == "/var/log/web.log"
    for spec in cfg.services():  # every valid ServiceConfig is a valid supervisor definition
        spec.to_service()
    tcp = MachineConfig.from_documents(
        base_docs(
            services=[{"name": "t", "command": "x", "healthCheck": {"tcp": "[::1]:2379"}}], kubespan=True
        )
    )
    h = tcp.service("t").to_service().health  # type: ignore[union-attr]
    assert (h.kind, h.host, h.port) == (sv.HealthKind.TCP, "::1", 2379)
    ex = MachineConfig.from_documents(
        base_docs(services=[{"name": "e", "command": "x", "healthCheck": {"exec": ["true"]}}])
    )
    assert ex.service("e").to_service().health.argv == ("true",)  # type: ignore[union-attr]

"""spanctl as a talosctl user expects it (issue 16 items 13-15): ``gen config NAME ENDPOINT`` with the
Kubernetes endpoint and ``--discovery``; the client config lookup (ours, then ``TALOSCONFIG``, then
``~/.talos/config``), ``-c/--cluster`` and ``config add/remove``; ``health`` over machined's services,
etcd and the mesh, with the mesh check also under ``mesh health``."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest
import yaml

from machined.config import MachineConfig
from machined.spanctl import main as cli


def spanctl(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(argv, out, err)
    return rc, out.getvalue(), err.getvalue()


# -- gen config NAME ENDPOINT (item 13) -------------------------------------------------------------


def test_gen_config_endpoint_is_kubernetes_and_discovery_a_flag(tmp_path: Path) -> None:
    d = tmp_path / "out"
    argv = ["gen", "config", "demo", "https://192.0.2.1:6443", "-o", str(d)]
    rc, _, err = spanctl([*argv, "--discovery", "https://a.example:3000/", "--discovery", "http://b.example"])
    assert rc == 0, err
    assert err == ""  # no note: the discovery services were given
    for name in ("controlplane.yaml", "worker.yaml"):
        text = (d / name).read_text()
        docs = list(yaml.safe_load_all(text))
        assert docs[0]["cluster"]["controlPlane"]["endpoint"] == "https://192.0.2.1:6443"
        m = MachineConfig.parse(text)
        assert m.warnings == ()
        assert [(e.name, e.url) for e in m.discovery_endpoints] == [
            ("default", "https://a.example:3000/"),
            ("discovery-2", "http://b.example"),
        ]


def test_gen_config_defaults_to_talos_public_discovery_with_a_note(tmp_path: Path) -> None:
    rc, _, err = spanctl(["gen", "config", "demo", "https://cp.example:6443", "-o", str(tmp_path)])
    assert rc == 0, err
    assert "https://discovery.talos.dev/" in err and "--discovery" in err
    m = MachineConfig.parse((tmp_path / "worker.yaml").read_text())
    assert [(e.name, e.url) for e in m.discovery_endpoints] == [("default", "https://discovery.talos.dev/")]


@pytest.mark.parametrize(
    "old_second_arg",
    [
        "http://discovery.example.net:3000",  # README's old example
        "https://disc.example:3000/",  # the registry's port
        "https://10.0.0.1:3000,10.0.0.2:3000",  # a host list of replicas
        "grpc://10.0.0.1",
        "http://admin:s3cret@10.0.0.1:3000",
    ],
)
def test_gen_config_refuses_a_discovery_url_as_endpoint(tmp_path: Path, old_second_arg: str) -> None:
    rc, out, err = spanctl(["gen", "config", "demo", old_second_arg, "-o", str(tmp_path)])
    assert rc == 1 and out == ""
    assert "Kubernetes API endpoint" in err and "--discovery" in err
    assert "s3cret" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_gen_config_bad_endpoint_as_talosctl(tmp_path: Path) -> None:
    rc, _, err = spanctl(["gen", "config", "demo", "10.0.0.1", "-o", str(tmp_path)])
    assert rc == 1
    assert "no scheme and port specified for the cluster endpoint URL; try: https://10.0.0.1:6443" in err
    assert list(tmp_path.iterdir()) == []


# -- client config lookup, -c/--cluster, config add/remove (item 14) --------------------------------

TALOSCONFIG_TEXT = """context: omni
contexts:
  omni:
    endpoints: [https://omni.example]
    cluster: prod
    auth:
      siderov1:
        identity: ops@example.com
    proxy-url: http://proxy.example:3128
  lab:
    endpoints: [192.0.2.7]
"""


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty HOME and none of the lookup variables set."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    for var in ("SPANCTL_CONFIG", "TALOSCONFIG", "TALOS_HOME"):
        monkeypatch.delenv(var, raising=False)
    return h


def test_lookup_ours_then_talosconfig_then_talos_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, home: Path
) -> None:
    from machined.spanctl.config import default_path

    ours, talos = home / ".spanctl" / "config", home / ".talos" / "config"
    assert default_path(None) == ours  # nothing exists: ours, created by the first write
    talos.parent.mkdir()
    talos.write_text(TALOSCONFIG_TEXT)
    assert default_path(None) == talos  # talosctl's file, when we have none
    monkeypatch.setenv("TALOSCONFIG", str(tmp_path / "tc"))
    assert default_path(None) == tmp_path / "tc"  # $TALOSCONFIG before ~/.talos/config, set = used
    ours.parent.mkdir()
    ours.write_text("")
    assert default_path(None) == ours  # ours first
    monkeypatch.setenv("SPANCTL_CONFIG", str(tmp_path / "env"))
    assert default_path(None) == tmp_path / "env"
    assert default_path(str(tmp_path / "flag")) == tmp_path / "flag"


def test_talos_home_when_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, home: Path) -> None:
    from machined.spanctl.config import default_path

    (tmp_path / "th").mkdir()
    (tmp_path / "th" / "config").write_text(TALOSCONFIG_TEXT)
    monkeypatch.setenv("TALOS_HOME", str(tmp_path / "th"))
    assert default_path(None) == tmp_path / "th" / "config"
    monkeypatch.setenv("TALOS_HOME", "relative/dir")  # talosctl ignores a relative one
    assert default_path(None) == home / ".spanctl" / "config"


def test_talosctl_file_is_read_and_written_in_place_keeping_its_keys(home: Path) -> None:
    talos = home / ".talos" / "config"
    talos.parent.mkdir()
    talos.write_text(TALOSCONFIG_TEXT)
    rc, out, err = spanctl(["config", "contexts"])
    assert rc == 0, err
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [["lab", "192.0.2.7"], ["*", "omni"]]
    assert spanctl(["config", "context", "lab"])[0] == 0
    assert not (home / ".spanctl").exists()  # written where it was read
    doc = yaml.safe_load(talos.read_text())
    assert doc["context"] == "lab"
    omni = doc["contexts"]["omni"]
    assert omni["cluster"] == "prod" and omni["proxy-url"] == "http://proxy.example:3128"
    assert omni["auth"] == {"siderov1": {"identity": "ops@example.com"}}


def test_config_add_reads_certificate_files(tmp_path: Path, home: Path) -> None:
    from machined import pki

    ca = pki.generate_ca()
    client = pki.issue_client(ca, ["os:reader"])
    files = {}
    for name, data in (("ca.crt", ca.crt), ("c.crt", client.crt), ("c.key", client.key)):
        files[name] = tmp_path / name
        files[name].write_bytes(data)
    cfg = tmp_path / "talosconfig"
    cfg.write_text("context: a\ncontexts:\n  a:\n    endpoints: [192.0.2.1]\n")
    argv = ["--talosconfig", str(cfg), "config", "add", "b", "--ca", str(files["ca.crt"])]
    rc, _, err = spanctl([*argv, "--crt", str(files["c.crt"]), "--key", str(files["c.key"])])
    assert rc == 0, err
    from machined.spanctl.config import ClientConfig

    loaded = ClientConfig.load(cfg)
    assert loaded.context == "a"  # the current context is kept, as talosctl
    b = loaded.contexts["b"]
    assert (b.ca, b.crt, b.key, b.endpoints) == (ca.crt, client.crt, client.key, [])
    # adding again replaces; --crt without --key is refused; a missing file is named
    assert spanctl(["--talosconfig", str(cfg), "config", "add", "b"])[0] == 0
    assert ClientConfig.load(cfg).contexts["b"].crt == b""
    rc, _, err = spanctl(["--talosconfig", str(cfg), "config", "add", "c", "--crt", str(files["c.crt"])])
    assert rc == 1 and "--crt and --key" in err and "c" not in ClientConfig.load(cfg).contexts
    rc, _, err = spanctl(["--talosconfig", str(cfg), "config", "add", "c", "--ca", str(tmp_path / "nope")])
    assert rc == 1 and "cannot read the CA certificate" in err and "nope" in err


def test_config_remove_glob_current_skipped_confirm_and_dry_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from machined.spanctl.config import ClientConfig

    cfg = tmp_path / "talosconfig"
    cfg.write_text(
        "context: lab-1\ncontexts:\n"
        + "".join(f"  {n}:\n    endpoints: [192.0.2.1]\n" for n in ("lab-1", "lab-2", "lab-3", "prod"))
    )
    base = ["--talosconfig", str(cfg), "config", "remove"]
    names = lambda: sorted(ClientConfig.load(cfg).contexts)  # noqa: E731
    rc, _, err = spanctl([*base, "lab-*", "-y", "--dry-run"])
    assert rc == 0 and names() == ["lab-1", "lab-2", "lab-3", "prod"]
    assert "skipping removal of current context 'lab-1'" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("y\nn\n"))  # yes to lab-2, no to lab-3
    rc, _, err = spanctl([*base, "lab-*"])
    assert rc == 0 and names() == ["lab-1", "lab-3", "prod"]
    assert "remove context 'lab-2'? [y/N]" in err and "remove context 'lab-3'? [y/N]" in err
    rc, _, err = spanctl([*base, "--noconfirm", "lab-?"])
    assert rc == 0 and names() == ["lab-1", "prod"] and "removing context 'lab-3'" in err
    rc, _, err = spanctl([*base, "-y", "staging*"])
    assert rc == 1 and "no contexts matched 'staging*'" in err


def _recorder_class() -> type:
    from spanapi.talos.machine import machine_pb2_grpc

    class Recorder(_Recorder, machine_pb2_grpc.MachineServiceServicer):  # the rest: UNIMPLEMENTED
        pass

    return Recorder


class _Recorder:
    """A MachineService answering ServiceList and keeping each call's metadata."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def ServiceList(self, request: object, context: object) -> object:
        from spanapi.talos.machine import machine_pb2

        self.metadata.append(dict(context.invocation_metadata()))  # type: ignore[attr-defined]
        return machine_pb2.ServiceListResponse(messages=[machine_pb2.ServiceList()])


@pytest.fixture
def machine_socket(tmp_path: Path):
    import grpc

    from spanapi.talos.machine import machine_pb2_grpc

    rec = _recorder_class()()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    machine_pb2_grpc.add_MachineServiceServicer_to_server(rec, server)  # type: ignore[arg-type]
    sock = tmp_path / "m.sock"
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    try:
        yield sock, rec
    finally:
        server.stop(None)


def test_cluster_flag_and_context_cluster_sent_as_context_metadata(tmp_path: Path, machine_socket) -> None:
    sock, rec = machine_socket
    cfg = tmp_path / "talosconfig"
    cfg.write_text("context: a\ncontexts:\n  a:\n    endpoints: []\n    cluster: from-config\n")
    base = ["--talosconfig", str(cfg), "--socket", str(sock)]
    assert spanctl([*base, "service"])[0] == 0
    assert spanctl([*base, "-c", "prod", "service"])[0] == 0
    assert spanctl([*base, "service", "--cluster", "staging"])[0] == 0  # after the command too
    cfg.write_text("context: a\ncontexts:\n  a:\n    endpoints: []\n")
    assert spanctl([*base, "service"])[0] == 0
    assert [m.get("context") for m in rec.metadata] == ["from-config", "prod", "staging", None]


# -- health: machined services, etcd, mesh (item 15) -----------------------------------------------


def _svc(id_: str, state: str = "Running", health: str = "unknown", msg: str = "") -> object:
    from spanapi.talos.machine import machine_pb2

    return machine_pb2.ServiceInfo(
        id=id_,
        state=state,
        health=machine_pb2.ServiceHealth(
            unknown=health == "unknown", healthy=health == "ok", last_message=msg
        ),
    )


class FakeCluster:
    """Per node: its services, KubeSpan on/off and peer statuses; ``down`` nodes fail every call."""

    def __init__(self, nodes: dict[str, dict], down: tuple[str, ...] = ()) -> None:
        self.nodes, self.down = nodes, set(down)
        self.calls: list[tuple[str, str | None]] = []

    def _node(self, metadata: object) -> str | None:
        return dict(metadata or ()).get("node")  # type: ignore[call-overload]

    def ServiceList(self, req: object, metadata: object = None, timeout: object = None) -> object:
        from machined.api.envelope import node_error
        from spanapi.talos.common import common_pb2
        from spanapi.talos.machine import machine_pb2

        node = self._node(metadata)
        self.calls.append(("ServiceList", node))
        if node in self.down:
            import grpc

            return node_error(
                machine_pb2.ServiceListResponse, node, grpc.StatusCode.UNAVAILABLE, "connection refused"
            )
        return machine_pb2.ServiceListResponse(
            messages=[
                machine_pb2.ServiceList(
                    metadata=common_pb2.Metadata(hostname=node or ""),
                    services=self.nodes[node]["services"],
                )
            ]
        )

    def List(self, req: object, metadata: object = None, timeout: object = None) -> Iterator[object]:
        from spanapi.talos.cosi import resource_pb2, state_pb2

        node = self._node(metadata)
        self.calls.append((req.type, node))  # type: ignore[attr-defined]
        if req.type == "KubeSpanConfigs.kubespan.talos.dev":  # type: ignore[attr-defined]
            specs = [{"enabled": self.nodes[node].get("kubespan", True)}]
        else:
            specs = self.nodes[node].get("peers", [])
        for spec in specs:
            yield state_pb2.ListResponse(
                resource=resource_pb2.Resource(spec=resource_pb2.Spec(yaml_spec=yaml.safe_dump(spec)))
            )


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_health(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake: FakeCluster, *args: str
) -> tuple[int, str, str]:
    from machined.spanctl.app import App

    monkeypatch.setattr(App, "machine", lambda self: fake)
    monkeypatch.setattr(App, "state", lambda self: fake)
    return spanctl(["--config", str(tmp_path / "none"), "-e", "192.0.2.1", "health", *args])


def test_health_all_ok_prints_conditions_as_talosctl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    peer = {"label": "b", "state": "up", "lastHandshakeTime": _now()}
    fake = FakeCluster(
        {
            "a": {
                "services": [_svc("etcd", health="ok"), _svc("web"), _svc("job", "Finished")],
                "peers": [peer],
            },
            "b": {"services": [_svc("off", "Skipped")], "peers": [{**peer, "label": "a"}]},
        }
    )
    rc, out, err = run_health(
        monkeypatch, tmp_path, fake, "--control-plane-nodes", "a", "--worker-nodes", "b"
    )
    assert (rc, out) == (0, "")
    assert err.splitlines() == [
        "waiting for all nodes to answer: OK",
        "waiting for etcd to be healthy: OK",
        "waiting for machined services to be healthy: OK",
        "waiting for the mesh to be healthy: OK",
    ]
    assert {n for _, n in fake.calls} == {"a", "b"}  # one call per node, routed with `node`


def test_health_skips_etcd_and_mesh_where_not_configured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeCluster({"n": {"services": [_svc("web")], "kubespan": False}})
    rc, _, err = run_health(monkeypatch, tmp_path, fake, "--worker-nodes", "n")
    assert rc == 0
    assert "waiting for etcd to be healthy: SKIP" in err
    assert "waiting for the mesh to be healthy: SKIP" in err
    assert not any(t == "KubeSpanPeerStatuses.kubespan.talos.dev" for t, _ in fake.calls)


@pytest.mark.parametrize(
    "nodes, flags, failure",
    [
        # etcd failing its health check on a control plane node
        (
            {"a": {"services": [_svc("etcd", health="fail", msg="connection refused")]}},
            ["--control-plane-nodes", "a"],
            "error from node a: etcd not healthy: etcd is unhealthy (connection refused)",
        ),
        # etcd stopped: not Running (Finished is fine for other services, not for etcd)
        (
            {"a": {"services": [_svc("etcd", "Finished")]}, "b": {"services": [_svc("etcd")]}},
            ["--control-plane-nodes", "a,b"],
            "error from node a: etcd not healthy: etcd is Finished",
        ),
        # a control plane node without etcd while others have it
        (
            {"a": {"services": [_svc("etcd")]}, "b": {"services": [_svc("web")]}},
            ["--control-plane-nodes", "a", "--control-plane-nodes", "b"],
            "error from node b: etcd not healthy: no etcd service on this control plane node",
        ),
        # a failed service and a waiting one, by name
        (
            {"w": {"services": [_svc("web", "Failed"), _svc("db", "Waiting"), _svc("ok")]}},
            ["--worker-nodes", "w"],
            "error from node w: services not healthy: db is Waiting; web is Failed",
        ),
        # the mesh: a peer down
        (
            {"w": {"services": [], "peers": [{"label": "x", "state": "down"}]}},
            ["--worker-nodes", "w"],
            "error from node w: mesh not healthy: peer x is down",
        ),
    ],
)
def test_health_fails_naming_the_node_and_what(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, nodes: dict, flags: list[str], failure: str
) -> None:
    rc, out, err = run_health(monkeypatch, tmp_path, FakeCluster(nodes), *flags, "--wait-timeout", "0")
    assert rc == 1 and out == ""
    assert failure in err.splitlines(), err


def test_health_stops_at_the_first_failing_condition(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeCluster({"a": {"services": [_svc("web")]}, "b": {"services": []}}, down=("b",))
    rc, _, err = run_health(monkeypatch, tmp_path, fake, "--worker-nodes", "a,b", "--wait-timeout", "0")
    assert rc == 1
    assert "error from node b: not answering: connection refused" in err
    assert "etcd" not in err and "mesh" not in err  # later conditions are not reached


def test_health_waits_until_a_condition_holds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeCluster({"a": {"services": [_svc("web", "Preparing")], "kubespan": False}})
    calls = {"n": 0}
    real = fake.ServiceList

    def flips(*a: object, **kw: object) -> object:  # answer, etcd, 2 polls Preparing, then Running
        calls["n"] += 1
        if calls["n"] >= 5:
            fake.nodes["a"]["services"] = [_svc("web")]
        return real(*a, **kw)

    fake.ServiceList = flips  # type: ignore[method-assign]
    rc, _, err = run_health(
        monkeypatch, tmp_path, fake, "-n", "a", "--interval", "10ms", "--wait-timeout", "5s"
    )
    assert rc == 0, err
    lines = err.splitlines()
    assert "waiting for machined services to be healthy: a: web is Preparing" in lines  # said once
    assert lines.count("waiting for machined services to be healthy: a: web is Preparing") == 1
    assert lines[-2:] == [
        "waiting for machined services to be healthy: OK",
        "waiting for the mesh to be healthy: SKIP",
    ]


def test_mesh_health_keeps_the_old_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from machined.spanctl.app import App

    fake = FakeCluster(
        {"a": {"services": [], "peers": [{"label": "b", "state": "up", "lastHandshakeTime": _now()}]}}
    )
    monkeypatch.setattr(App, "state", lambda self: fake)
    rc, out, err = spanctl(
        ["--config", str(tmp_path / "none"), "-e", "192.0.2.1", "-n", "a", "mesh", "health"]
    )
    assert (rc, out, err) == (0, "a: mesh OK (1/1 peers up)\n", "")

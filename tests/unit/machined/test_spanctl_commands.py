"""spanctl commands against fake API responses built with the generated stubs: NODE-first tables,
apid's per-node error entries printed after the output (stderr) with exit status 1, routing metadata,
clear connection errors, and gen."""

from __future__ import annotations

import io
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import timestamp_pb2

from machined.api.envelope import node_error
from machined.spanctl import main as cli
from machined.spanctl.app import App
from machined.spanctl.client import Errors, NodeError, describe_rpc_error, split_messages
from machined.state.catalog import MESH_DEFINITIONS
from machined.state.definitions import RESOURCE_DEFINITION_TYPE
from spanapi.talos.common import common_pb2
from spanapi.talos.cosi import resource_pb2, state_pb2
from spanapi.talos.machine import machine_pb2

PEER_STATUS = "KubeSpanPeerStatuses.kubespan.talos.dev"


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def md(host: str) -> common_pb2.Metadata:
    return common_pb2.Metadata(hostname=host)


def service(id_: str, state: str, healthy: bool) -> machine_pb2.ServiceInfo:
    return machine_pb2.ServiceInfo(
        id=id_,
        state=state,
        health=machine_pb2.ServiceHealth(healthy=healthy),
        events=machine_pb2.ServiceEvents(
            events=[
                machine_pb2.ServiceEvent(
                    msg=f"{id_} is {state}", state=state, ts=timestamp_pb2.Timestamp(seconds=1)
                )
            ]
        ),
    )


class FakeMachine:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, list[tuple[str, str]]]] = []

    def _rec(self, name: str, req: Any, metadata: Any) -> None:
        self.calls.append((name, req, list(metadata or ())))

    def Hostname(self, req: Any, metadata: Any = None, timeout: Any = None) -> Any:
        self._rec("Hostname", req, metadata)
        node = dict(metadata or ()).get("node", "n1")
        return machine_pb2.HostnameResponse(messages=[machine_pb2.Hostname(metadata=md(node), hostname=node)])

    def ServiceList(self, req: Any, metadata: Any = None, timeout: Any = None) -> Any:
        self._rec("ServiceList", req, metadata)
        ok = machine_pb2.ServiceListResponse(
            messages=[
                machine_pb2.ServiceList(metadata=md("10.0.0.1"), services=[service("etcd", "Running", True)]),
                machine_pb2.ServiceList(metadata=md("10.0.0.2"), services=[service("etcd", "Failed", False)]),
            ]
        )
        bad = node_error(
            machine_pb2.ServiceListResponse, "10.0.0.3", grpc.StatusCode.UNAVAILABLE, "connection refused"
        )
        ok.MergeFrom(bad)  # what apid's merging produces: concatenated envelopes
        return ok

    def Logs(self, req: Any, metadata: Any = None) -> Iterator[common_pb2.Data]:
        self._rec("Logs", req, metadata)
        yield common_pb2.Data(metadata=md("n1"), bytes=b"line one\nline t")
        yield common_pb2.Data(metadata=md("n2"), bytes=b"other\n")
        yield common_pb2.Data(metadata=md("n1"), bytes=b"wo\n")
        yield common_pb2.Data(metadata=common_pb2.Metadata(hostname="n3", error="log not found"))

    def Version(self, req: Any, metadata: Any = None, timeout: Any = None) -> Any:
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connect failed: No such file or directory")


class FakeState:
    def __init__(self, peers: dict[str | None, list[dict[str, Any]]] | None = None) -> None:
        self.peers = peers or {}
        self.calls: list[tuple[str, Any, list[tuple[str, str]]]] = []

    def List(self, req: Any, metadata: Any = None, timeout: Any = None) -> Iterator[Any]:
        self.calls.append(("List", req, list(metadata or ())))
        node = dict(metadata or ()).get("node")
        if req.type == RESOURCE_DEFINITION_TYPE:
            for d in MESH_DEFINITIONS:
                yield state_pb2.ListResponse(
                    resource=resource_pb2.Resource(
                        spec=resource_pb2.Spec(yaml_spec=yaml.safe_dump(d.to_data()))
                    )
                )
            return
        if node == "down":
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "node down")
        for i, spec in enumerate(self.peers.get(node, [])):
            yield state_pb2.ListResponse(
                resource=resource_pb2.Resource(
                    metadata=resource_pb2.Metadata(
                        namespace="kubespan", type=PEER_STATUS, id=f"K{i}=", version="1"
                    ),
                    spec=resource_pb2.Spec(yaml_spec=yaml.safe_dump(spec)),
                )
            )


def at_nodes(tmp_path: Path, *nodes: str) -> list[str]:
    """The global flags of a call to ``nodes`` (one ``-n`` each) through endpoint 192.0.2.1, no config file."""
    return ["--config", str(tmp_path / "none"), "-e", "192.0.2.1", *(a for n in nodes for a in ("-n", n))]


def run(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], machine: Any = None, state: Any = None
) -> tuple[int, str, str]:
    if machine is not None:
        monkeypatch.setattr(App, "machine", lambda self: machine)
    if state is not None:
        monkeypatch.setattr(App, "state", lambda self: state)
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(argv, out, err)
    return rc, out.getvalue(), err.getvalue()


def test_service_list_with_a_failed_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    m = FakeMachine()
    rc, out, err = run(
        monkeypatch,
        [*at_nodes(tmp_path, "10.0.0.1,10.0.0.2", "10.0.0.3"), "service"],
        machine=m,
    )
    lines = out.splitlines()
    assert lines[0].split() == ["NODE", "SERVICE", "STATE", "HEALTH", "LAST", "CHANGE", "LAST", "EVENT"]
    assert lines[1].split()[:4] == ["10.0.0.1", "etcd", "Running", "OK"]
    assert lines[2].split()[:4] == ["10.0.0.2", "etcd", "Failed", "Fail"]
    assert err == "error from node 10.0.0.3: connection refused\n"
    assert rc == 1
    # through apid, one call fanned out with `nodes` metadata
    assert [c[0] for c in m.calls] == ["ServiceList"]
    assert m.calls[0][2] == [("nodes", "10.0.0.1"), ("nodes", "10.0.0.2"), ("nodes", "10.0.0.3")]


def test_logs_are_joined_into_lines_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    rc, out, err = run(
        monkeypatch, ["--socket", "/nonexistent.sock", "logs", "etcd", "--tail", "5"], machine=FakeMachine()
    )
    assert out.splitlines() == ["n1: line one", "n2: other", "n1: line two"]
    assert err == "error from node n3: log not found\n"
    assert rc == 1


def test_socket_sends_no_routing_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    m = FakeMachine()
    run(monkeypatch, ["--socket", "/x.sock", "-n", "n1", "logs", "etcd"], machine=m)
    assert m.calls[0][0] == "Logs" and m.calls[0][2] == []
    assert m.calls[0][1].tail_lines == -1


def test_connection_error_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    rc, out, err = run(monkeypatch, ["--socket", "/nonexistent.sock", "version"], machine=FakeMachine())
    assert rc == 1
    assert out.startswith("Client:\n")
    assert err.startswith("error from node ") and "cannot connect to /nonexistent.sock" in err
    assert "Traceback" not in err


def test_real_missing_socket_is_a_clean_error(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["--socket", str(tmp_path / "no.sock"), "get", "kubespanpeerstatuses"], out, err)
    assert rc == 1
    assert "cannot connect to" in err.getvalue() and "Traceback" not in err.getvalue()


def test_get_resolves_alias_and_loops_nodes_with_node_metadata(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    st = FakeState({"a": [{"label": "b", "state": "up", "endpoint": "1.2.3.4:51820"}], "b": []})
    rc, out, err = run(
        monkeypatch,
        [*at_nodes(tmp_path, "a,b,down"), "get", "kubespanpeerstatus"],
        state=st,
    )
    assert rc == 1
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["NODE", "NAMESPACE", "TYPE", "ID", "VERSION"]
    assert lines[1].split()[:7] == ["a", "kubespan", "KubeSpanPeerStatuses", "K0=", "1", "b", "1.2.3.4:51820"]
    assert len(lines) == 2
    assert err == "error from node down: cannot connect to 192.0.2.1:50000: node down\n"
    lists = [c for c in st.calls if c[1].type == PEER_STATUS]
    assert [c[2] for c in lists] == [[("node", "a")], [("node", "b")], [("node", "down")]]
    assert all(c[1].namespace == "kubespan" for c in lists)


def test_unknown_type_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    rc, out, err = run(monkeypatch, ["--socket", "/x.sock", "get", "nosuchthing"], state=FakeState())
    assert rc == 1 and out == ""
    assert err == 'spanctl: resource "nosuchthing" is not registered\n'


def test_mesh_matrix_from_several_nodes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    st = FakeState({"a": [{"label": "b", "state": "up"}], "b": [{"label": "a", "state": "down"}]})
    rc, out, err = run(
        monkeypatch,
        [*at_nodes(tmp_path, "a,b,down"), "mesh"],
        FakeMachine(),
        st,
    )
    assert out.splitlines() == ["NODE   a      b", "a      -      up", "b      down   -"]
    assert err.startswith("error from node down:") and rc == 1


def test_mesh_health_fails_after_wait_timeout_with_reasons(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    st = FakeState({"a": [{"label": "b", "state": "up", "lastHandshakeTime": "2000-01-01T00:00:00Z"}]})
    rc, _, err = run(
        monkeypatch,
        [*at_nodes(tmp_path, "a"), "mesh", "health", "--wait-timeout", "0"],
        FakeMachine(),
        st,
    )
    assert rc == 1
    assert "error from node a: mesh not healthy: peer b: last handshake" in err


def test_mesh_health_ok(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datetime as dt

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    st = FakeState({"a": [{"label": "b", "state": "up", "lastHandshakeTime": now}]})
    rc, out, err = run(
        monkeypatch,
        [*at_nodes(tmp_path, "a"), "mesh", "health"],
        FakeMachine(),
        st,
    )
    assert (rc, out, err) == (0, "a: mesh OK (1/1 peers up)\n", "")


def test_split_messages_and_error_rendering() -> None:
    resp = machine_pb2.VersionResponse(messages=[machine_pb2.Version(metadata=md("n1"))])
    resp.MergeFrom(node_error(machine_pb2.VersionResponse, "n2", grpc.StatusCode.UNAVAILABLE, "down"))
    good, errs = split_messages(resp.messages, "x")
    assert [g.metadata.hostname for g in good] == ["n1"]
    assert errs == [NodeError("n2", "down")]
    e = Errors()
    e.extend(errs)
    e.add("", "whole call failed")
    buf = io.StringIO()
    assert e.report(buf) == 1
    assert buf.getvalue() == "error from node n2: down\nerror: whole call failed\n"
    assert Errors().report(io.StringIO()) == 0


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (grpc.StatusCode.UNAVAILABLE, "cannot connect to sock: boom"),
        (grpc.StatusCode.PERMISSION_DENIED, "permission denied: boom"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "sock did not answer in time"),
    ],
)
def test_describe_rpc_error(code: grpc.StatusCode, text: str) -> None:
    assert describe_rpc_error(FakeRpcError(code, "boom"), "sock") == text


def test_config_commands_edit_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.write_text("context: a\ncontexts:\n  a: {endpoints: [192.0.2.1]}\n  b: {endpoints: [192.0.2.2]}\n")
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["--config", str(cfg), "config", "node", "10.0.0.1,10.0.0.2"], out, err) == 0
    assert cli.main(["--config", str(cfg), "config", "context", "b"], out, err) == 0
    assert cli.main(["--config", str(cfg), "config", "endpoint", "192.0.2.9"], out, err) == 0
    out = io.StringIO()
    assert cli.main(["--config", str(cfg), "config", "contexts"], out, err) == 0
    assert out.getvalue().splitlines() == [
        "CURRENT   NAME   ENDPOINTS   NODES",
        "          a      192.0.2.1   10.0.0.1,10.0.0.2",
        "*         b      192.0.2.9",
    ]
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert cli.main(["--config", str(cfg), "config", "context", "zzz"], io.StringIO(), err) == 1
    assert 'context "zzz" is not defined' in err.getvalue()


def test_gen_secrets_and_config(tmp_path: Path) -> None:
    pytest.importorskip("machined.gen")
    out, err = io.StringIO(), io.StringIO()
    s = tmp_path / "secrets.yaml"
    assert cli.main(["gen", "secrets", "-o", str(s)], out, err) == 0, err.getvalue()
    assert stat.S_IMODE(s.stat().st_mode) == 0o600
    d = tmp_path / "out"
    argv = ["gen", "config", "demo", "https://192.0.2.1:6443", "--with-secrets", str(s), "-o", str(d)]
    argv += ["--discovery", "https://disc.example:3000/"]
    assert cli.main([*argv, "-e", "192.0.2.1"], out, err) == 0, err.getvalue()
    for name in ("controlplane.yaml", "worker.yaml", "talosconfig"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    out = io.StringIO()
    assert cli.main(["--config", str(d / "talosconfig"), "config", "info"], out, err) == 0
    assert "Roles:                os:admin" in out.getvalue()
    assert "192.0.2.1" in out.getvalue()
    err = io.StringIO()
    assert cli.main(argv, io.StringIO(), err) == 1  # refuses to overwrite
    assert "refusing to overwrite" in err.getvalue() and "Traceback" not in err.getvalue()

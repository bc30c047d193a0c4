"""spanctl flags a talosctl user expects (issue 16 item 16), each against fakes of the machine and
resource APIs: get -o jsonpath, the g alias, version --short, logs -k, events --duration, patch
--patch-file/--namespace, apply-config -p/--config-patch and -i/--insecure."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from machined.spanctl import main as cli
from machined.spanctl.app import App
from machined.spanctl.jsonpath import JSONPathError, Template, parse_expression, parse_format
from machined.spanctl.output import ResourceWriter
from machined.state.catalog import DEFINITIONS, IDENTITY, KUBESPAN_PEER_STATUS
from machined.state.definitions import RESOURCE_DEFINITION_TYPE
from spanapi.talos.common import common_pb2
from spanapi.talos.cosi import resource_pb2, state_pb2
from spanapi.talos.machine import machine_pb2


def peer(id_: str, label: str, addrs: list[str]) -> resource_pb2.Resource:
    return resource_pb2.Resource(
        metadata=resource_pb2.Metadata(namespace="kubespan", type=KUBESPAN_PEER_STATUS, id=id_, version="3"),
        spec=resource_pb2.Spec(
            yaml_spec=yaml.safe_dump({"label": label, "endpoint": "10.0.0.2:51820", "allowed": addrs})
        ),
    )


# --- the template language ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "steps"),
    [
        (".spec.label", ("spec", "label")),
        ("$.spec.label", ("spec", "label")),
        ("spec.label", ("spec", "label")),
        (".spec.allowed[0]", ("spec", "allowed", 0)),
        (".spec.allowed[-1]", ("spec", "allowed", -1)),
        (".metadata.labels['talos.dev/role']", ("metadata", "labels", "talos.dev/role")),
        ('.metadata.labels["a.b"]', ("metadata", "labels", "a.b")),
        (".", ()),
    ],
)
def test_expressions_parse(expr: str, steps: tuple) -> None:
    assert parse_expression(expr) == steps


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{range .items[*]}{.x}{end}", "range is not supported"),
        ("{..label}", "recursive descent"),
        ("{.a[?(@.x)]}", "filters"),
        ("{.a[1:2]}", "cannot parse"),
        ("{.spec", "unclosed"),
        ("no braces", "no {expression}"),
    ],
)
def test_unsupported_templates_are_refused_clearly(template: str, problem: str) -> None:
    with pytest.raises(JSONPathError, match=problem.replace("{", r"\{").replace("(", r"\(")):
        Template(template)


def test_scalars_one_per_line_lists_and_maps_as_indented_json() -> None:
    data = {"node": "n1", "metadata": {"id": "K="}, "spec": {"label": "n2", "allowed": ["a", "b"], "n": 3}}
    assert Template("{.metadata.id}").render(data) == "K=\n"
    assert Template("{.spec.allowed[*]}").render(data) == "a\nb\n"
    assert Template("{.spec.allowed}").render(data) == '[\n    "a",\n    "b"\n]\n'
    # maps: Go's encoder sorts the keys
    assert json.loads(Template("{.spec}").render(data)) == data["spec"]
    assert Template("{.spec}").render(data).splitlines()[1] == '    "allowed": ['
    # literal text is a result of its own (a line), as in talosctl
    assert Template("{.node} {.spec.n}").render(data) == "n1\n \n3\n"
    with pytest.raises(JSONPathError, match="nope is not found"):
        Template("{.spec.nope}").render(data)
    with pytest.raises(JSONPathError, match="index out of bounds"):
        Template("{.spec.allowed[5]}").render(data)


def test_jsonpath_format_and_its_errors() -> None:
    assert parse_format("table") is None
    assert parse_format("jsonpath={.spec}") is not None
    with pytest.raises(JSONPathError, match="needs a template"):
        parse_format("jsonpath")
    out = io.StringIO()
    w = ResourceWriter(out, "jsonpath={.spec.label}", None)
    w.add("n1", peer("K=", "n2", []))
    w.flush()
    assert out.getvalue() == "n2\n"
    with pytest.raises(ValueError, match="must be one of"):
        ResourceWriter(out, "wide", None)


def test_watch_jsonpath_sees_the_event() -> None:
    out = io.StringIO()
    w = ResourceWriter(out, "jsonpath={.event} {.metadata.id}", None, watch=True)
    w.add("n1", peer("K=", "n2", []), state_pb2.DESTROYED)
    assert out.getvalue() == "destroyed\n \nK=\n"


# --- fakes ----------------------------------------------------------------------------------------------


class FakeState:
    """Resource definitions (ours) and a fixed set of resources per (namespace, type)."""

    def __init__(self, resources: dict[tuple[str, str], list[resource_pb2.Resource]] | None = None) -> None:
        self.resources = resources or {}
        self.calls: list[tuple[str, Any]] = []

    def List(self, req: Any, metadata: Any = None, timeout: Any = None) -> Iterator[Any]:
        self.calls.append(("List", req))
        if req.type == RESOURCE_DEFINITION_TYPE:
            for d in DEFINITIONS:
                yield state_pb2.ListResponse(
                    resource=resource_pb2.Resource(
                        spec=resource_pb2.Spec(yaml_spec=yaml.safe_dump(d.to_data()))
                    )
                )
            return
        for r in self.resources.get((req.namespace, req.type), []):
            yield state_pb2.ListResponse(resource=r)

    def Get(self, req: Any, metadata: Any = None, timeout: Any = None) -> Any:
        self.calls.append(("Get", req))
        for r in self.resources.get((req.namespace, req.type), []):
            if r.metadata.id == req.id:
                return state_pb2.GetResponse(resource=r)
        raise AssertionError(f"unexpected Get {req}")


def md(host: str) -> common_pb2.Metadata:
    return common_pb2.Metadata(hostname=host)


class FakeMachine:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def Version(self, req: Any, metadata: Any = None, timeout: Any = None) -> Any:
        self.calls.append(("Version", req))
        return machine_pb2.VersionResponse(
            messages=[
                machine_pb2.Version(
                    metadata=md("n1"),
                    version=machine_pb2.VersionInfo(tag="v0.9.0", sha="abc", os="linux", arch="amd64"),
                )
            ]
        )

    def Logs(self, req: Any, metadata: Any = None) -> Iterator[common_pb2.Data]:
        self.calls.append(("Logs", req))
        yield common_pb2.Data(metadata=md("n1"), bytes=b"hello\n")

    def Events(self, req: Any, metadata: Any = None) -> Iterator[Any]:
        self.calls.append(("Events", req))
        return iter(())

    def ApplyConfiguration(self, req: Any, metadata: Any = None, timeout: Any = None) -> Any:
        self.calls.append(("ApplyConfiguration", req))
        return machine_pb2.ApplyConfigurationResponse(
            messages=[machine_pb2.ApplyConfiguration(metadata=md("n1"), mode_details="Applied configuration")]
        )


def run(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argv: list[str],
    *,
    machine: Any = None,
    state: Any = None,
) -> tuple[int, str, str]:
    if machine is not None:
        monkeypatch.setattr(App, "machine", lambda self: machine)
    if state is not None:
        monkeypatch.setattr(App, "state", lambda self: state)
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["--config", str(tmp_path / "none"), "-e", "192.0.2.1", "-n", "n1", *argv], out, err)
    return rc, out.getvalue(), err.getvalue()


# --- get -o jsonpath, g ---------------------------------------------------------------------------------


def test_get_jsonpath_and_the_g_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    st = FakeState(
        {("kubespan", KUBESPAN_PEER_STATUS): [peer("K1=", "n2", ["10.0.0.2/32"]), peer("K2=", "n3", [])]}
    )
    rc, out, err = run(
        monkeypatch, tmp_path, ["g", "kubespanpeerstatuses", "-o", "jsonpath={.spec.label}"], state=st
    )
    assert (rc, out, err) == (0, "n2\nn3\n", "")
    rc, out, _ = run(
        monkeypatch, tmp_path, ["get", "kubespanpeerstatuses", "K1=", "-o", "jsonpath={.node}"], state=st
    )
    assert (rc, out) == (0, "n1\n")


def test_get_jsonpath_missing_key_is_that_nodes_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    st = FakeState({("kubespan", KUBESPAN_PEER_STATUS): [peer("K1=", "n2", ["a"]), peer("K2=", "n3", [])]})
    rc, out, err = run(
        monkeypatch, tmp_path, ["get", "kubespanpeerstatuses", "-o", "jsonpath={.spec.allowed[0]}"], state=st
    )
    assert rc == 1 and out == "a\n"
    assert "KubeSpanPeerStatuses K2=" in err and "index out of bounds" in err


def test_get_bad_output_format_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rc, out, err = run(
        monkeypatch, tmp_path, ["get", "kubespanpeerstatuses", "-o", "jsonpath={range .x}"], state=FakeState()
    )
    assert rc != 0 and out == "" and "range is not supported" in err


def test_get_identities(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ident = resource_pb2.Resource(
        metadata=resource_pb2.Metadata(namespace="cluster", type=IDENTITY, id="local", version="1"),
        spec=resource_pb2.Spec(yaml_spec="nodeId: 4Xy9\n"),
    )
    st = FakeState({("cluster", IDENTITY): [ident]})
    rc, out, _ = run(monkeypatch, tmp_path, ["get", "identities"], state=st)
    assert rc == 0
    assert out.splitlines()[1].split() == ["n1", "cluster", "Identities", "local", "1", "4Xy9"]


# --- version --short, logs -k, events --duration ---------------------------------------------------------


def test_version_short_shortens_the_client_part_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from discovery.version import version

    m = FakeMachine()
    rc, out, _ = run(monkeypatch, tmp_path, ["version", "--short"], machine=m)
    lines = out.splitlines()
    assert rc == 0 and lines[:2] == ["Client:", f"spanctl {version()}"]
    assert lines[2] == "Server:" and "\tTag:         v0.9.0" in lines  # the server part stays long
    rc, out, _ = run(monkeypatch, tmp_path, ["version", "--short", "--client"], machine=m)
    assert out == f"Client:\nspanctl {version()}\n" and len(m.calls) == 1


def test_logs_k_asks_for_a_kubernetes_container(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    m = FakeMachine()
    run(monkeypatch, tmp_path, ["logs", "-k", "kube-system/kube-apiserver"], machine=m)
    req = m.calls[-1][1]
    assert (req.namespace, req.driver, req.id) == ("k8s.io", common_pb2.CRI, "kube-system/kube-apiserver")
    run(monkeypatch, tmp_path, ["logs", "--kubernetes", "x"], machine=m)
    assert m.calls[-1][1].namespace == "k8s.io"
    rc, out, _ = run(monkeypatch, tmp_path, ["logs", "etcd"], machine=m)
    req = m.calls[-1][1]
    assert rc == 0 and out == "n1: hello\n"
    assert (req.namespace, req.driver) == ("system", common_pb2.CONTAINERD)


@pytest.mark.parametrize(("arg", "seconds"), [("90s", 90), ("1m30s", 90), ("2h", 7200), ("1.9s", 1)])
def test_events_duration_is_tail_seconds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, arg: str, seconds: int
) -> None:
    m = FakeMachine()
    rc, _, err = run(monkeypatch, tmp_path, ["events", "--duration", arg], machine=m)
    assert rc == 0, err
    assert m.calls[-1][1].tail_seconds == seconds
    run(monkeypatch, tmp_path, ["events"], machine=m)
    assert m.calls[-1][1].tail_seconds == 0


def test_events_duration_must_be_a_duration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        run(monkeypatch, tmp_path, ["events", "--duration", "soon"], machine=FakeMachine())


# --- apply-config -p / -i, patch --patch-file / --namespace ---------------------------------------------

BASE = "version: v1alpha1\nmachine:\n  type: worker\ncluster:\n  clusterName: c\n"


def test_apply_config_patches_the_file_before_sending(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    f = tmp_path / "worker.yaml"
    f.write_text(BASE)
    pf = tmp_path / "p.yaml"
    pf.write_text("cluster:\n  clusterName: from-file\n")
    m = FakeMachine()
    rc, _, err = run(
        monkeypatch,
        tmp_path,
        [
            "apply-config",
            "-f",
            str(f),
            "-p",
            "machine:\n  token: abc\n",
            "--config-patch",
            f"@{pf}",
            "--config-patch",
            '[{"op": "replace", "path": "/machine/type", "value": "controlplane"}]',
        ],
        machine=m,
    )
    assert rc == 0, err
    sent = yaml.safe_load(m.calls[-1][1].data)
    assert sent["machine"] == {"type": "controlplane", "token": "abc"}
    assert sent["cluster"]["clusterName"] == "from-file"
    assert f.read_text() == BASE  # the local file is not changed
    run(monkeypatch, tmp_path, ["apply-config", "-f", str(f)], machine=m)
    assert m.calls[-1][1].data == BASE.encode()  # without patches: the file's bytes, untouched


def test_apply_config_bad_patch_sends_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "worker.yaml"
    f.write_text(BASE)
    m = FakeMachine()
    rc, _, err = run(
        monkeypatch,
        tmp_path,
        ["apply", "-f", str(f), "-p", '[{"op": "remove", "path": "/machine/nope"}]'],
        machine=m,
    )
    assert rc != 0 and "--config-patch" in err and m.calls == []
    rc, _, err = run(monkeypatch, tmp_path, ["apply", "-f", str(f), "-p", f"@{tmp_path}/missing"], machine=m)
    assert rc != 0 and "cannot read" in err and m.calls == []


def test_apply_config_insecure_is_refused_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "worker.yaml"
    f.write_text(BASE)
    m = FakeMachine()
    for flag in ("-i", "--insecure"):
        rc, out, err = run(monkeypatch, tmp_path, ["apply-config", flag, "-f", str(f)], machine=m)
        assert rc != 0 and out == "" and "maintenance mode" in err and "--socket" in err
    assert m.calls == []


class ConfigState(FakeState):
    def __init__(self, namespace: str) -> None:
        r = resource_pb2.Resource(
            metadata=resource_pb2.Metadata(
                namespace=namespace, type="MachineConfigs.config.talos.dev", id="v1alpha1", version="1"
            ),
            spec=resource_pb2.Spec(yaml_spec=BASE),
        )
        super().__init__({(namespace, "MachineConfigs.config.talos.dev"): [r]})


def test_patch_file_after_the_p_patches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pf = tmp_path / "p.yaml"
    pf.write_text("cluster:\n  clusterName: last\n")
    m, st = FakeMachine(), ConfigState("config")
    rc, _, err = run(
        monkeypatch,
        tmp_path,
        ["patch", "mc", "-p", "cluster:\n  clusterName: first\n", "--patch-file", str(pf)],
        machine=m,
        state=st,
    )
    assert rc == 0, err
    assert yaml.safe_load(m.calls[-1][1].data)["cluster"]["clusterName"] == "last"
    assert st.calls[-1][1].namespace == "config"
    rc, _, err = run(monkeypatch, tmp_path, ["patch", "mc", "--patch-file", str(pf)], machine=m, state=st)
    assert rc == 0 and yaml.safe_load(m.calls[-1][1].data)["cluster"]["clusterName"] == "last"


def test_patch_needs_a_patch_and_honours_namespace(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    m = FakeMachine()
    rc, _, err = run(monkeypatch, tmp_path, ["patch", "mc"], machine=m, state=ConfigState("config"))
    assert rc != 0 and "--patch-file" in err and m.calls == []
    st = ConfigState("elsewhere")
    rc, _, err = run(
        monkeypatch,
        tmp_path,
        ["patch", "machineconfig", "--namespace", "elsewhere", "-p", "machine:\n  token: t\n"],
        machine=m,
        state=st,
    )
    assert rc == 0, err
    assert st.calls[-1][1].namespace == "elsewhere"
    assert yaml.safe_load(m.calls[-1][1].data)["machine"]["token"] == "t"

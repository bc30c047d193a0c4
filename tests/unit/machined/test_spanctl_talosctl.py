"""spanctl as a talosctl user expects it (issue 16 items 13-15): ``gen config NAME ENDPOINT`` with the
Kubernetes endpoint and ``--discovery``; the client config lookup (ours, then ``TALOSCONFIG``, then
``~/.talos/config``), ``-c/--cluster`` and ``config add/remove``; ``health`` over machined's services,
etcd and the mesh, with the mesh check also under ``mesh health``."""

from __future__ import annotations

import io
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

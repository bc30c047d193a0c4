"""The version is written once (pyproject.toml) and every daemon's --version prints it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from discovery import version as version_mod
from discovery.server import main as discovery_main
from kubespan import cli as kubespan_cli
from machined import main as machined_main

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_comes_from_the_installed_metadata():
    # the editable install's metadata is regenerated from pyproject.toml (make venv re-installs on change)
    assert version_mod.version() == PYPROJECT_VERSION


def test_version_without_metadata(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(version_mod, "DISTRIBUTION", "kubespan-mesh-not-installed")
    assert version_mod.version() == "0+unknown"


@pytest.mark.parametrize(
    ("prog", "main"),
    [
        ("discovery-service", discovery_main.main),
        ("kubespan", kubespan_cli.main),
        ("machined", machined_main.main),
    ],
)
def test_daemon_version_flag(prog, main, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {PYPROJECT_VERSION}"


def test_discovery_service_go_style_version_flag(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        discovery_main.main(["-version"])
    assert capsys.readouterr().out.strip() == f"discovery-service {PYPROJECT_VERSION}"

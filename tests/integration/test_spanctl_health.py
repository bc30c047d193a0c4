"""``spanctl health`` against a real machined (host, mesh off) that runs a real etcd as its ``etcd``
service (HTTP health check on /health) and a service whose exec health check follows a file: health
passes, then fails naming the unhealthy service, then naming etcd once it is stopped."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from machined_lab import start_host_machined

from machined.apid.testing import stop_processes
from machined.config.testing import config_yaml
from spanutil.etcdlab import etcd_binary, free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = base64.b64encode(b"h" * 32).decode()
ENV = {"SPANCTL_CONFIG": "/nonexistent/spanctl-config", "PATH": "/usr/bin:/bin"}


def spanctl(sock: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [sys.executable, "-m", "machined.spanctl.main", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=ENV,
    )
    assert "Traceback" not in p.stderr, p.stderr
    return p


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    etcd = etcd_binary()
    if etcd is None:
        pytest.skip("etcd is not installed")
    d = tmp_path_factory.mktemp("spanctl-health")
    taken: set[int] = set()
    client, peer = free_port(taken=taken), free_port(taken=taken)
    flag = d / "checker-ok"
    flag.touch()
    etcd_service = {
        "name": "etcd",
        "command": etcd,
        "args": [
            "--name=health",
            f"--data-dir={d / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=health=http://127.0.0.1:{peer}",
        ],
        "healthCheck": {"http": f"http://127.0.0.1:{client}/health", "interval": "500ms", "timeout": "2s"},
    }
    checker = {
        "name": "checker",
        "command": "/bin/sleep",
        "args": ["3600"],
        "healthCheck": {"exec": ["/usr/bin/test", "-e", str(flag)], "interval": "300ms"},
    }
    cfg = config_yaml(
        cluster_id="spanctl-health",
        secret=SECRET,
        discovery=(),
        kubespan=False,
        agent={"nodename": "health-node", "httpStatusAddr": ""},
        services=[etcd_service, checker],
        machine_type="controlplane",
    )
    proc, log = start_host_machined(d, cfg)
    sock = d / "state" / "machined.sock"
    try:
        yield sock, flag
    finally:
        stop_processes([proc], 15)
        if proc.returncode not in (0, -15, None):
            print(log.read_text()[-3000:])


def _health_column(sock: Path, service: str) -> str:
    """The HEALTH cell of ``service`` in ``spanctl service`` (machined's view right now)."""
    for line in spanctl(sock, "service").stdout.splitlines()[1:]:
        cells = line.split()
        if cells[1:2] == [service]:
            return cells[3]
    return ""


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.2)


def test_health_passes_then_names_what_broke(node: tuple[Path, Path]) -> None:
    sock, flag = node
    p = spanctl(sock, "health", "--wait-timeout", "40s")
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert lines[-4:] == [
        "waiting for all nodes to answer: OK",
        "waiting for etcd to be healthy: OK",
        "waiting for machined services to be healthy: OK",
        "waiting for the mesh to be healthy: SKIP",  # KubeSpan is off on this node
    ]
    # the checker's health check fails once its file is gone
    flag.unlink()
    wait_for(lambda: _health_column(sock, "checker") == "Fail", 20, "checker's health check failing")
    p = spanctl(sock, "health", "--wait-timeout", "3s")
    assert p.returncode == 1
    assert "error from node health-node: services not healthy: checker is unhealthy" in p.stderr
    assert "waiting for etcd to be healthy: OK" in p.stderr
    flag.touch()
    # etcd stopped: the etcd condition fails first, naming it
    assert spanctl(sock, "service", "etcd", "stop").returncode == 0
    p = spanctl(sock, "health", "--wait-timeout", "2s")
    assert p.returncode == 1
    assert "error from node health-node: etcd not healthy: etcd is Finished" in p.stderr.splitlines()
    assert spanctl(sock, "service", "etcd", "start").returncode == 0
    p = spanctl(sock, "health", "--wait-timeout", "40s")
    assert p.returncode == 0, p.stderr

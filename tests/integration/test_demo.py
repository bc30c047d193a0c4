"""Scenario 2 of the lab issue, through the one-command demo: two clouds behind their own NAT routers, a
node behind a symmetric NAT, one behind two NATs in series (CGNAT), a public node, a public relay node and
the discovery server (with STUN) on the internet segment; every pair connects, directly where nat.md §2
says it can and through the relay elsewhere, every node reaches every other over the mesh, node-IP traffic
is steered into the tunnel, and nothing is left behind."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

from netns.lab import PREFIX, list_netns

pytestmark = pytest.mark.root


def _get(url: str) -> tuple[str, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    with opener.open(url, timeout=10) as r:
        return r.headers.get("Content-Type", ""), r.read()


def _wait_all_up(url: str, names: set[str], timeout: float = 15.0) -> dict[str, Any]:
    """The dashboard's /api/view once every node is reachable and every ordered pair up (fresh)."""
    deadline = time.monotonic() + timeout
    while True:
        _, body = _get(url + "api/view")
        v = json.loads(body)
        n = len(names)
        if v["summary"] == {"nodes": n, "reachable": n, "pairsUp": n * (n - 1), "pairs": n * (n - 1)}:
            return v
        assert time.monotonic() < deadline, v["summary"]
        time.sleep(0.5)


def _check_view(v: dict[str, Any], names: set[str]) -> None:
    assert set(v["names"]) == names
    for a in names:
        for b in names - {a}:
            c = v["matrix"][a][b]
            assert c["state"] == "up" and not c["stale"] and c["path"] in ("lan", "direct", "relay"), (
                a,
                b,
                c,
            )
    assert v["matrix"]["h1"]["a1"]["path"] == "relay" and v["matrix"]["h1"]["a1"]["relayVia"] == "relay"
    rows = {r["name"]: r for r in v["nodes"]}
    assert rows["h1"]["natClass"] and rows["a1"]["meshAddress"] and rows["a1"]["services"] is None


def _spanctl_dashboard(command: str, names: set[str]) -> None:
    """Run the command the demo printed (on a free port instead of the default): its page shows the same."""
    argv = shlex.split(command)
    assert argv[1:3] == ["dashboard", "--web"] and argv.count("--agent") == len(names), argv
    argv[3:3] = ["127.0.0.1:0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.match(r"dashboard: (http://127\.0\.0\.1:\d+/)", line)
        assert m, line + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        _check_view(_wait_all_up(m[1], names), names)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_nat_demo_forms_full_mesh_direct_or_relayed_and_cleans_up() -> None:
    """Run with ``--keep``: the checks, then the lab stays up with every node's page forwarded to the
    host's loopback and the web dashboard served from those pages until SIGINT, then the same teardown
    (one demo run covers both). The dashboard (the demo's own, and the printed command run here) shows
    every node reachable and every pair up."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "netns.demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    urls: dict[str, str] = {}
    dashboard, command = "", ""
    rest = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the pytest timeout bounds this
            lines.append(line)
            if m := re.fullmatch(r"\s+(\S+)\s+(http://127\.0\.0\.1:\d+/)", line.rstrip()):
                urls[m[1]] = m[2]
            if m := re.search(
                r"web dashboard of the whole mesh .*: (http://127\.0\.0\.1:\d+/)$", line.rstrip()
            ):
                dashboard = m[1]
            if m := re.search(r"the same from another shell: (.*)$", line.rstrip()):
                command = m[1]
            if "tears the lab down" in line:
                break
        kept = "".join(lines)
        assert "tears the lab down" in kept and len(urls) == 8, kept[-4000:]
        # a node's page and its /status, from the host, through the forwarder into the namespace
        ctype, page = _get(urls["a1"])
        assert ctype.startswith("text/html") and b"node.js" in page
        _, body = _get(urls["h1"] + "status")
        st = json.loads(body)
        assert st["nodename"] == "h1" and len(st["peers"]) == 7
        assert all("rtt" in p for p in st["peers"]) and any(p["rtt"] for p in st["peers"]), st["peers"]
        # the web dashboard from the agents' pages: the demo's own, then the printed command
        assert dashboard and command, kept[-4000:]
        ctype, page = _get(dashboard)
        assert ctype.startswith("text/html")
        _check_view(_wait_all_up(dashboard, set(urls)), set(urls))
        assert all(f"--agent {u.rstrip('/')}" in command for u in urls.values()), command
        _spanctl_dashboard(command, set(urls))
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-4000:]
    assert "== demo finished" in out, out[-4000:]
    assert "56/56 ordered pairs answered" in out, out[-4000:]
    # which pairs are direct and which relayed: the symmetric node h1 is relayed against every node behind
    # a port-restricted NAT (both clouds and the CGNAT node), everything else is direct
    assert (
        "28/28 pairs connected (100 %): 2 direct over a LAN, 21 direct through the NATs, 5 relayed via relay"
        in out
    ), out[-4000:]
    relayed = set(re.findall(r"✓ (\S+) ↔ (\S+) +relayed via relay", out))
    assert relayed == {("a1", "h1"), ("a2", "h1"), ("b1", "h1"), ("b2", "h1"), ("h1", "c1")}, relayed
    assert re.search(r"✓ c1 ↔ a1 +direct|✓ a1 ↔ c1 +direct", out), out[-4000:]  # two NATs in series, punched
    assert "✗" not in out, out[-4000:]
    # traffic to another node's underlay address went through the tunnel (tx counter grew)
    assert out.count("✓ a1 → 10.1.0.12") == 1 and out.count("✓ b1 → 10.1.0.11") == 1, out[-4000:]
    assert "nothing left" in out
    # none of the demo's namespaces (``PREFIX<pid>x<n>-...``) is left; other labs may run meanwhile
    assert not [n for n in list_netns() if n.startswith(f"{PREFIX}{proc.pid}x")]

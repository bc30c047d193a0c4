"""The lab harness itself: nodes, links, segments, private /run/wireguard, cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from netns.lab import Lab, cleanup_stale, list_netns

pytestmark = pytest.mark.root


def test_nodes_links_segments_and_cleanup() -> None:
    with Lab() as lab:
        a, b, c = lab.node("a"), lab.node("b"), lab.node("c")
        lab.link(a, b, ["10.99.0.1/30", "fd99::1/64"], ["10.99.0.2/30", "fd99::2/64"])
        seg = lab.segment("lan")
        lab.attach(a, seg, ["10.98.0.1/24"], ifname="lan0")
        lab.attach(c, seg, ["10.98.0.3/24"], ifname="lan0")
        assert a.ping("10.99.0.2") and a.ping("fd99::2") and c.ping("10.98.0.1")
        assert not b.ping("10.98.0.3", timeout=1)  # b is not on the segment
        names = [n.ns for n in lab.nodes.values()]
        assert set(names) <= set(list_netns())
    assert not set(names) & set(list_netns())


def test_private_run_wireguard_per_node() -> None:
    with Lab() as lab:
        a, b = lab.node("a"), lab.node("b")
        for node in (a, b):
            p = node.popen("sh", "-c", f"echo {node.name} > /run/wireguard/owner")
            assert p.wait(10) == 0
        assert (a.run_dir / "wireguard" / "owner").read_text() == "a\n"
        assert (b.run_dir / "wireguard" / "owner").read_text() == "b\n"
        assert not os.path.exists("/run/wireguard/owner")


def test_processes_are_killed_and_stale_labs_removed() -> None:
    with Lab() as lab:
        n = lab.node("a")
        p = n.popen("sleep", "300")
        time.sleep(0.2)
    assert p.poll() is not None
    # a lab whose owner died is removed by the next lab / cleanup_stale()
    code = (
        "from netns.lab import Lab; import os; lab = Lab(); lab.node('x'); "
        "print(lab.nodes['x'].ns, flush=True); os._exit(0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out in list_netns()
    assert out in cleanup_stale()
    assert out not in list_netns()

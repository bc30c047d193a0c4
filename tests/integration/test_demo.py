"""Scenario 2 of the lab issue, through the one-command demo: two clouds behind their own NAT routers,
a public node and the discovery server on the internet segment; every node reaches every other over the
mesh, node-IP traffic is steered into the tunnel, and nothing is left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from netns.lab import list_netns

pytestmark = pytest.mark.root


def test_two_cloud_nat_demo_forms_full_mesh_and_cleans_up() -> None:
    before = set(list_netns())
    proc = subprocess.run(
        [sys.executable, "-m", "netns.demo"], capture_output=True, text=True, timeout=240, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "20/20 ordered pairs answered" in out, out[-4000:]
    # traffic to another node's underlay address went through the tunnel (tx counter grew)
    assert out.count("✓ a1 → 10.1.0.12") == 1 and out.count("✓ b1 → 10.1.0.11") == 1, out[-4000:]
    assert "nothing left" in out
    assert set(list_netns()) <= before

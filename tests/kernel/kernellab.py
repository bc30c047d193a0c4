"""Kernel-lab helpers: the tests in this directory run inside the VM that scripts/kernel_lab.py boots
(Debian's kernel with WireGuard and sch_netem, emulated by QEMU TCG: 10-20x slower than the host).

The lab and the mesh helpers are the integration suite's (netns.lab, netns.mesh, and the scenario
helpers of tests/integration/test_scenarios.py); only the waits differ: generous, because of emulation.
Timing targets stay in bench/; these tests assert behaviour and print figures.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

from netns.impair import netem_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
#: The integration suite's mesh scenario helpers (lan, status, peers, full_mesh, Ping, stale_state, ...).
scenarios = importlib.import_module("test_scenarios")

IN_LAB = bool(os.environ.get("KUBESPAN_KERNEL_LAB"))
#: Waits for a mesh to come up under emulation (46 s measured for two nodes; the host needs ~3 s).
UP_TIMEOUT = 240.0
#: Waits for a repair, a failover or a peer removal to be seen.
REPAIR_TIMEOUT = 120.0


def require_netem() -> None:
    """Skip where the kernel has no sch_netem; inside the kernel lab a missing netem is a failure."""
    reason = netem_available()
    if reason is None:
        return
    if IN_LAB:
        pytest.fail(f"the kernel lab's kernel has no netem: {reason}")
    pytest.skip(f"needs netem: {reason}")

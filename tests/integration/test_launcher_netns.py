"""Agents forked from the lab's launcher (netns.launcher) are agents like exec'd ones: each in its own
node's network namespace with its own /run/wireguard, its own environment and session, forming a
mesh; the lab stops, reaps and cleans them up like any other process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from netns.lab import Lab
from netns.launcher import ForkedProcess
from netns.mesh import MeshLab, stop_agents

pytestmark = pytest.mark.root
DISC_PORT = 3000


def test_forked_agents_mesh_in_their_own_nodes_and_are_reaped() -> None:
    with Lab() as lab:
        try:
            ml = MeshLab(lab, launch="fork")
            seg = lab.segment("lan")
            disc = lab.node("disc")
            lab.attach(disc, seg, ["10.60.0.2/24"])
            ml.start_discovery(disc, f"10.60.0.2:{DISC_PORT}")
            nodes = []
            for i in (1, 2, 3):
                node = lab.node(f"n{i}")
                lab.attach(node, seg, [f"10.60.0.{10 + i}/24"])
                nodes.append(node)
            time.sleep(1)
            mns = ml.start_nodes(nodes[:2], env={"LAUNCH_TEST": "batch"})  # forked in one batch
            mns.append(ml.start_node(nodes[2], env={"LAUNCH_TEST": "batch"}))  # and alone
            ml.wait("3-node mesh of forked agents", ml.all_up, timeout=60, interval=0.3)
            launcher_pid = lab.launcher()._proc.pid
            for node, mn in zip(nodes, mns, strict=True):
                (proc,) = node.procs
                assert isinstance(proc, ForkedProcess) and proc.poll() is None
                # its node's network namespace, not the host's (or another node's)
                assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(f"/run/netns/{node.ns}").st_ino
                assert os.getsid(proc.pid) == proc.pid  # its own session: killpg reaches it and its children
                # its environment (seen in its wireguard-go's: /proc/<agent>/environ shows the launcher's)
                (wg,) = node.pids("wireguard-go")
                environ = Path(f"/proc/{wg}/environ").read_bytes().split(b"\0")
                assert b"LAUNCH_TEST=batch" in environ
                # its own /run/wireguard: wireguard-go's socket is in the node's directory
                assert (node.run_dir / "wireguard" / "kubespan.sock").exists()
                assert "kubespan" in node.run("ip", "-br", "link").stdout
                assert _ppid(proc.pid) == launcher_pid
                assert mn.status()["peers"] and len(mn.status()["peers"]) == 2
            # a running agent: wait() times out like Popen's
            with pytest.raises(subprocess.TimeoutExpired):
                nodes[0].procs[0].wait(0.1)
            # SIGTERM: the agent leaves the mesh and exits 0; SIGKILL: -9
            assert ml.stop_node("n1") == 0
            assert nodes[0].procs[0].poll() == 0
            killed = nodes[1].procs[0]
            os.killpg(killed.pid, signal.SIGKILL)
            assert killed.wait(10) == -signal.SIGKILL
        finally:
            stop_agents(lab)
        survivor = nodes[2].procs[0]
        assert survivor.poll() == 0
    assert not _alive(launcher_pid), "the launcher outlived its lab"
    for proc in (p for n in nodes for p in n.procs):
        assert not _alive(proc.pid)


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"

"""The lab harness itself: nodes, links, segments, private /run/wireguard, cleanup, async process
supervision, impairments, traffic helpers."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns import NetemUnavailableError, ping, tcp_transfer, udp_echo, udp_mapped
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


def _gone(pid: int, wait: float = 5) -> bool:
    """The process no longer exists (or is a zombie waiting for its new parent to reap it)."""
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_killed_owner_is_cleaned_up_by_the_next_lab() -> None:
    code = """
import json, time
from netns.lab import Lab
lab = Lab()
net, lan = lab.internet(), lab.segment("lan")
h = lab.node("h")
lab.attach(h, lan, ["192.168.9.10/24"])
lab.router("r", lan, net, "192.168.9.1/24", "203.0.113.1/24")
lab.loss(h, 50)
p = h.popen("sleep", "300")
ns = [n.ns for n in lab.nodes.values()] + lab._switches
print(json.dumps({"ns": ns, "dir": str(lab.dir), "pid": p.pid}), flush=True)
time.sleep(60)
"""
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        ready, _, _ = select.select([owner.stdout], [], [], 30)
        assert ready, "owner did not build its lab"
        info = json.loads(owner.stdout.readline())
    finally:
        owner.kill()  # SIGKILL: none of its cleanup runs
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
    assert set(info["ns"]) <= set(list_netns()) and Path(info["dir"]).is_dir()
    assert not _gone(info["pid"], wait=0)
    with Lab():
        pass
    assert not set(info["ns"]) & set(list_netns())
    assert not Path(info["dir"]).exists()
    assert _gone(info["pid"])


SIGTERM_OWNER = """
import asyncio, json, signal, sys, time
from netns.lab import Lab

async def main():
    async with Lab() as lab:
        a = lab.node("a")
        p = await a.spawn("sleep", "300")
        print(json.dumps({"ns": a.ns, "dir": str(lab.dir), "pid": p.pid}), flush=True)
        await asyncio.sleep(60)

if sys.argv[1] == "async":
    asyncio.run(main())
else:
    with Lab() as lab:
        a = lab.node("a")
        p = a.popen("sleep", "300")
        print(json.dumps({"ns": a.ns, "dir": str(lab.dir), "pid": p.pid}), flush=True)
        time.sleep(60)
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
"""


@pytest.mark.parametrize("form", ["sync", "async"])
def test_sigterm_runs_the_labs_cleanup(form: str) -> None:
    """``timeout`` or a CI job's end sends SIGTERM: the lab is removed at once, not left for the next."""
    owner = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_OWNER, form], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        ready, _, _ = select.select([owner.stdout], [], [], 30)
        assert ready, "owner did not build its lab"
        info = json.loads(owner.stdout.readline())
        assert info["ns"] in list_netns()
        owner.terminate()
        _, err = owner.communicate(timeout=30)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
    assert owner.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    assert info["ns"] not in list_netns(), "removed by the owner's own cleanup"
    assert not Path(info["dir"]).exists()
    assert _gone(info["pid"])


def test_a_lab_restores_sigterms_default_and_leaves_other_handlers_alone() -> None:
    import signal

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with Lab():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        with Lab():  # nested: the outer one restores
            pass
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def mine(signum: int, frame: object) -> None:
        return None

    signal.signal(signal.SIGTERM, mine)
    try:
        with Lab():
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_a_child_forked_inside_a_lab_dies_on_sigterm() -> None:
    """A child forked without exec (pyroute2's netns helpers) gets SIGTERM's default back: with the
    lab's handler inherited, test_dataplane's asyncio subprocess waits stalled until their timeout."""
    import signal

    with Lab():
        pid = os.fork()
        if pid == 0:  # the child: report, never return into pytest
            os._exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the parent keeps its handler


async def test_async_lab_supervises_processes_and_cleans_up_after_an_exception() -> None:
    with pytest.raises(RuntimeError, match="boom") as raised:
        async with Lab() as lab:
            a = lab.node("a")
            (a.run_dir / "wireguard" / "who").write_text("a\n")
            hello = await a.spawn(
                "sh", "-c", "echo hello from $(cat /run/wireguard/who); exit 3", name="hello"
            )
            async with asyncio.timeout(10):
                assert await hello.wait() == 3
            assert "hello from a" in hello.tail()  # ran in the node, with the node's private /run/wireguard
            sleeper = await a.spawn("sleep", "300")
            stubborn = await a.spawn(
                "sh", "-c", "trap '' TERM; echo ignoring TERM; while :; do sleep 0.1; done", name="stubborn"
            )
            await asyncio.sleep(0.3)
            assert sleeper.running and stubborn.running
            assert sleeper.pid in a.pids()
            assert await stubborn.terminate(grace=0.5) == -9  # TERM ignored: killed after the grace period
            report = lab.report()
            assert "hello from a" in report and "[exit 3]" in report and "ignoring TERM" in report
            namespaces, lab_dir = [n.ns for n in lab.nodes.values()], lab.dir
            raise RuntimeError("boom")
    assert sleeper.returncode == -15  # SIGTERM at lab close, reaped
    assert not set(namespaces) & set(list_netns())
    assert not lab_dir.exists()
    assert any("hello from a" in note for note in getattr(raised.value, "__notes__", []))


def test_loss_and_blackhole_stop_traffic_and_remove_restores_it() -> None:
    with Lab() as lab:
        seg = lab.segment("lan")
        a, b, c = lab.node("a"), lab.node("b"), lab.node("c")
        for i, n in enumerate((a, b, c), 1):
            lab.attach(n, seg, [f"10.97.0.{i}/24"])
        fast = {"count": 3, "interval": 0.05, "timeout": 1}
        base = ping(a, "10.97.0.2", **fast)
        assert base.ok and base.loss == 0 and len(base.rtts) == 3

        full = lab.loss(a, 100, ifname="eth0")
        assert ping(a, "10.97.0.2", **fast).loss == 100
        assert full.packets() >= 3
        full.remove()
        assert ping(a, "10.97.0.2", **fast).ok

        hole = lab.blackhole(a, dst="10.97.0.2")
        assert ping(a, "10.97.0.2", **fast).loss == 100
        assert ping(b, "10.97.0.1", **fast).loss == 100  # both directions
        assert ping(a, "10.97.0.3", **fast).ok  # only that path
        hole.remove()
        hole.remove()  # idempotent
        assert ping(a, "10.97.0.2", **fast).ok and ping(b, "10.97.0.1", **fast).ok

        # an endpoint (ip:port) black hole: that UDP port only, the host stays reachable
        udp_echo(b, "10.97.0.2", 3478)
        udp_echo(b, "10.97.0.2", 3479)
        ep = lab.blackhole(a, dst="10.97.0.2:3478")
        got = udp_mapped(a, ["10.97.0.2:3478", "10.97.0.2:3479"], timeout=0.3, tries=2)
        assert got[0] is None and got[1] is not None
        assert ping(a, "10.97.0.2", **fast).ok
        lab.loss(c, 100)  # left in place: the lab removes it at close
        assert len(lab._handles) == 2
        ep.remove()
        assert udp_mapped(a, ["10.97.0.2:3478"], timeout=0.3, tries=2) != [None]
        assert a.run("nft", "list", "table", "netdev", "kslab_impair").stdout.count("drop") == 0


def test_loss_percentage_is_roughly_right() -> None:
    with Lab() as lab:
        a, b = lab.node("a"), lab.node("b")
        lab.link(a, b, ["10.96.0.1/30"], ["10.96.0.2/30"])
        lossy = lab.loss(a, 30, dst="10.96.0.2")
        r = ping(a, "10.96.0.2", count=200, interval=0.01, timeout=1)
        assert r.sent == 200
        assert 15 <= r.loss <= 45, r.loss  # 30 % +- 4.6 standard deviations
        assert abs(lossy.packets() - (r.sent - r.received)) <= 2


def test_delay_with_netem_where_the_kernel_has_it() -> None:
    with Lab() as lab:
        a, b = lab.node("a"), lab.node("b")
        lab.link(a, b, ["10.95.0.1/30"], ["10.95.0.2/30"])
        try:
            slow = lab.delay(a, 50, ifname="eth0")
        except NetemUnavailableError as e:
            assert str(e).startswith("netem not available: ")
            pytest.skip(str(e))
        assert min(ping(a, "10.95.0.2", count=3, interval=0.05).rtts) >= 45
        slow.remove()
        assert max(ping(a, "10.95.0.2", count=3, interval=0.05).rtts) < 40


def test_tcp_transfer_is_bounded_and_reports_failure() -> None:
    with Lab() as lab:
        a, b = lab.node("a"), lab.node("b")
        lab.link(a, b, ["10.94.0.1/30", "fd94::1/64"], ["10.94.0.2/30", "fd94::2/64"])
        t = tcp_transfer(a, b, "10.94.0.2", size=4 << 20, timeout=10)
        assert t.received == 4 << 20 and t.seconds > 0 and not t.error
        assert tcp_transfer(a, b, "fd94::2", size=1 << 20, timeout=10).received == 1 << 20
        lab.blackhole(a, dst="10.94.0.2")
        t0 = time.monotonic()
        t = tcp_transfer(a, b, "10.94.0.2", timeout=1.5)
        assert t.received == 0 and t.error
        assert time.monotonic() - t0 < 10

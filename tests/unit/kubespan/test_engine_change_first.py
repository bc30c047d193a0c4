"""A discovery change that lands on a due full pass is written first, by a light pass, and the full
pass follows at once (issue 18: a one-change reconcile at 1000 peers stays within 10 ms even when it
coincides with the 1 s poll or the periodic data plane check)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from test_engine import Rig, _readdress, make_rig, remote

from kubespan.dataplane.ruleset import SET_IPV4


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return make_rig(tmp_path, first_contact=None)


async def test_a_change_on_a_due_poll_is_written_by_a_light_pass_then_the_full_pass_runs(rig: Rig) -> None:
    wg, nft, links, clock = rig.wg, rig.nft, rig.links, rig.clock
    _k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    k2, _, d2 = remote("node-b", "b", "10.5.0.3", 3)
    async with rig.running(d1, d2) as m:
        # the poll, the host check and the data plane check are all due
        clock.t += m.cfg.reconcile_interval + m.cfg.timings.poll_interval
        assert not m._light_possible(clock.t)
        gets, reads, link_calls, light = wg.gets, nft.reads, len(links.calls), m.light_passes
        m._wake.clear()
        rig.disc.put(_readdress(d2, "198.51.100.4"))
        await m.reconcile()
        # the change is written: one UpdatePeer, one set diff; nothing was re-read
        assert m.light_passes == light + 1
        assert (wg.gets, nft.reads, len(links.calls)) == (gets, reads, link_calls)
        last = wg.applies[-1]
        assert [type(op).__name__ for op in last] == ["UpdatePeer"] and last[0].public_key == k2
        assert ipaddress.ip_network("198.51.100.4/32") in nft.sets[SET_IPV4]
        assert [t.kind for t in nft.transactions][-1] == "diff"
        # and the loop is woken for the full pass, which re-reads everything and writes nothing
        assert m._wake.is_set()
        applies = len(wg.applies)
        await m.reconcile()
        assert m.light_passes == light + 1
        assert wg.gets == gets + 1 and nft.reads == reads + 1 and len(links.calls) > link_calls
        assert len(wg.applies) == applies


async def test_a_change_goes_first_only_once_in_a_row(rig: Rig) -> None:
    """Changes arriving at every pass cannot starve the due full pass."""
    wg, clock = rig.wg, rig.clock
    _k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    _k2, _, d2 = remote("node-b", "b", "10.5.0.3", 3)
    async with rig.running(d1, d2) as m:
        clock.t += m.cfg.timings.poll_interval
        gets = wg.gets
        rig.disc.put(_readdress(d2, "198.51.100.4"))
        await m.reconcile()
        assert wg.gets == gets
        rig.disc.put(_readdress(d2, "198.51.100.5"))
        await m.reconcile()  # another change, but the full pass is due and was deferred once
        assert wg.gets == gets + 1
        assert ipaddress.ip_network("198.51.100.5/32") in wg.device.peers[_k2].allowed_ips


async def test_an_outside_change_is_not_deferred(rig: Rig) -> None:
    """Only timers may wait a pass: a data plane reported changed (netlink) keeps the full pass."""
    wg, nft, clock = rig.wg, rig.nft, rig.clock
    _k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    _k2, _, d2 = remote("node-b", "b", "10.5.0.3", 3)
    async with rig.running(d1, d2) as m:
        clock.t += 0.2  # between polls
        m.wake(dataplane=True)
        gets, reads, light = wg.gets, nft.reads, m.light_passes
        rig.disc.put(_readdress(d2, "198.51.100.4"))
        await m.reconcile()
        assert m.light_passes == light and wg.gets == gets + 1 and nft.reads == reads + 1


async def test_without_a_change_a_due_poll_is_a_full_pass(rig: Rig) -> None:
    wg, clock = rig.wg, rig.clock
    _k1, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    async with rig.running(d1) as m:
        clock.t += m.cfg.timings.poll_interval
        gets, light = wg.gets, m.light_passes
        await m.reconcile()
        assert wg.gets == gets + 1 and m.light_passes == light

"""Links, routes and rules are re-read every 2 s only while no netlink watch reports their changes (issue 18).

With the watch subscribed, a change to them wakes a pass that repairs it at once, and the timed
re-read (five netlink dumps, the largest part of an idle agent's CPU) is a 30 s safety net; the
nftables table, which the watch does not cover, is still read back every ``reconcile_interval``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_engine import Rig, make_rig, remote

from kubespan.constants import WATCHED_LINKS_CHECK_INTERVAL
from kubespan.dataplane.ruleset import SET_IPV4


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return make_rig(tmp_path, first_contact=None)


async def subscribed(rig: Rig) -> None:
    for _ in range(10):
        if rig.m._watched.is_set():
            return
        await asyncio.sleep(0)
    raise AssertionError("the engine never subscribed to the link manager's events")


async def test_a_reported_change_is_repaired_at_once(rig: Rig) -> None:
    _, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    async with rig.running(d1) as m:
        await subscribed(rig)
        await rig.links.remove_route("inet6")  # the fake reports it, as netlink does
        rig.clock.t += 0.01  # no timer is due
        await m.reconcile()
        assert rig.links.routes == {"inet", "inet6"}


async def test_while_watched_links_are_re_read_only_as_a_safety_net(rig: Rig) -> None:
    _, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    async with rig.running(d1) as m:
        await subscribed(rig)
        rig.clock.t += WATCHED_LINKS_CHECK_INTERVAL  # past the first safety-net re-read
        await m.reconcile()
        rig.links.routes.discard("inet6")  # a change no event reports
        rig.nft.remove_table()
        rig.clock.t += m.cfg.reconcile_interval
        await m.reconcile()
        assert rig.links.routes == {"inet"}, "links were re-read although the watch is live"
        assert rig.nft.sets is not None and SET_IPV4 in rig.nft.sets, "the nft table is still checked"
        rig.clock.t += WATCHED_LINKS_CHECK_INTERVAL
        await m.reconcile()
        assert rig.links.routes == {"inet", "inet6"}


async def test_after_a_resync_links_are_re_read_every_interval_again(rig: Rig) -> None:
    _, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    async with rig.running(d1) as m:
        await subscribed(rig)
        await rig.links._emit("resync", "resync", "netlink socket closed")  # events may be lost
        assert not m._watched.is_set()
        await m.reconcile()
        rig.links.routes.discard("inet6")
        rig.clock.t += m.cfg.reconcile_interval
        await m.reconcile()
        assert rig.links.routes == {"inet", "inet6"}

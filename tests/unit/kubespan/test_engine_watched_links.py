"""The data plane is re-read every 2 s only while no watch reports its changes (issue 18).

With the netlink watch subscribed, a change to links, routes or rules wakes a pass that repairs it
at once, and their timed re-read (five netlink dumps, the largest part of an idle agent's CPU) is a
30 s safety net. The nftables table is read back every ``reconcile_interval`` unless its own watch
(``nft_watch``, nf_tables notifications) is subscribed too; then a reported change is repaired at
once and the read-back is the same 30 s safety net.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest
from test_engine import Rig, make_rig, remote

from kubespan.constants import WATCHED_CHECK_INTERVAL
from kubespan.dataplane.fake import FakeWatch
from kubespan.dataplane.links import Callback
from kubespan.dataplane.ruleset import SET_IPV4
from kubespan.hostinfo import StaticHost


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return make_rig(tmp_path, first_contact=None)


async def subscribed(rig: Rig, event: asyncio.Event | None = None) -> None:
    for _ in range(10):
        if (event or rig.m._watched).is_set():
            return
        await asyncio.sleep(0)
    raise AssertionError("the engine never subscribed to the watch's events")


@pytest.fixture
def nft_watch(rig: Rig) -> FakeWatch:
    rig.m.nft_watch = watch = FakeWatch()
    return watch


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
        rig.clock.t += WATCHED_CHECK_INTERVAL  # past the first safety-net re-read
        await m.reconcile()
        rig.links.routes.discard("inet6")  # a change no event reports
        rig.nft.remove_table()
        rig.clock.t += m.cfg.reconcile_interval
        await m.reconcile()
        assert rig.links.routes == {"inet"}, "links were re-read although the watch is live"
        assert rig.nft.sets is not None and SET_IPV4 in rig.nft.sets, "the nft table is still checked"
        rig.clock.t += WATCHED_CHECK_INTERVAL
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


async def test_while_both_watches_are_live_the_table_is_read_back_only_as_a_safety_net(
    rig: Rig, nft_watch: FakeWatch
) -> None:
    _, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    async with rig.running(d1) as m:
        await subscribed(rig)
        await subscribed(rig, m._nft_watched)
        rig.clock.t += WATCHED_CHECK_INTERVAL
        await m.reconcile()
        reads = rig.nft.reads
        rig.nft.remove_table()  # a change no event reports
        for _ in range(3):
            rig.clock.t += m.cfg.reconcile_interval
            await m.reconcile()
        assert rig.nft.sets is None and rig.nft.reads == reads, "the table was read although watched"
        rig.clock.t += WATCHED_CHECK_INTERVAL
        await m.reconcile()
        assert rig.nft.sets is not None and SET_IPV4 in rig.nft.sets


async def test_a_reported_table_change_is_repaired_at_once(rig: Rig, nft_watch: FakeWatch) -> None:
    _, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    async with rig.running(d1) as m:
        await subscribed(rig, m._nft_watched)
        rig.nft.remove_table()
        await nft_watch._emit("nft", "changed", "1 change(s) to table kubespan by nft (task 1)")
        assert m._wake.is_set()
        rig.clock.t += 0.01  # no timer is due
        await m.reconcile()
        assert rig.nft.sets is not None and SET_IPV4 in rig.nft.sets
        assert not m._nft_due


async def test_after_a_table_watch_resync_the_table_is_read_back_every_interval_again(
    rig: Rig, nft_watch: FakeWatch
) -> None:
    _, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    async with rig.running(d1) as m:
        await subscribed(rig, m._nft_watched)
        await nft_watch._emit("resync", "resync", "nftables watch: [Errno 105] No buffer space available")
        assert not m._nft_watched.is_set()
        reads = rig.nft.reads
        await m.reconcile()
        assert rig.nft.reads == reads + 1, "notices may have been lost: the table is read back at once"
        rig.nft.remove_table()
        rig.clock.t += m.cfg.reconcile_interval
        await m.reconcile()
        assert rig.nft.sets is not None and SET_IPV4 in rig.nft.sets


async def test_node_addresses_are_read_when_reported_and_as_a_safety_net(rig: Rig) -> None:
    _, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    async with rig.running(d1) as m:
        await subscribed(rig)
        added = ipaddress.ip_interface("192.0.2.7/24")
        host = m.host
        assert isinstance(host, StaticHost)
        host.address_list.append(added)  # no event: not seen until the safety net
        for _ in range(3):
            rig.clock.t += m.cfg.reconcile_interval
            await m.reconcile()
        assert added not in m.local_addresses, "node addresses were read although the watch is live"
        await rig.links._emit("hostaddr", "new", "192.0.2.7/24 index 2")
        rig.clock.t += 0.01
        await m.reconcile()
        assert added in m.local_addresses
        _, endpoints, _ = rig.disc.published[-1]
        assert "192.0.2.7" in [str(ipaddress.ip_address(e.ip)) for e in endpoints]
        host.address_list.remove(added)
        rig.clock.t += WATCHED_CHECK_INTERVAL
        await m.reconcile()
        assert added not in m.local_addresses


class FailingWatch(FakeWatch):
    """Subscribes, then fails (say its socket broke) when the test sets ``fail``."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = asyncio.Event()

    async def watch(self, callback: Callback, *, ready: asyncio.Event | None = None) -> None:
        if ready is not None:
            ready.set()
        await self.fail.wait()
        raise OSError("netlink socket gone")


async def test_a_failed_table_watch_reads_the_table_back_not_the_links(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    broken = FailingWatch()
    rig.m.nft_watch = broken
    _, _, d1 = remote("node-a", "a", "10.5.0.2", 2)
    async with rig.running(d1) as m:
        await subscribed(rig, m._nft_watched)
        rig.clock.t += 0.01
        await m.reconcile()
        rig.links.routes.discard("inet6")  # changes no event reports
        rig.nft.remove_table()
        broken.fail.set()
        for _ in range(50):  # the watch fails, its resync wakes a pass
            await asyncio.sleep(0.001)
            if rig.nft.sets is not None:
                break
        # the table watch's own resync: the table is read back (and repaired) at once ...
        assert rig.nft.sets is not None and SET_IPV4 in rig.nft.sets
        assert not m._nft_watched.is_set() and m._watched.is_set()
        # ... and nothing else: the link watch is live, so the links are not re-read
        assert rig.links.routes == {"inet"}, "a table watch's failure forced a read of the links"
        assert any("nftables watch failed" in r.getMessage() for r in caplog.records)

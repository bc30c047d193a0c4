"""apid's backend channel cache: bounded LRU, idle expiry, never closing under a running call."""

import asyncio
import contextlib

import pytest

from machined.apid.channels import ChannelCache
from spanutil.testing import ManualClock


class Chan:
    def __init__(self, key):
        self.key, self.closed = key, 0

    async def close(self, grace=None):
        self.closed += 1


@contextlib.asynccontextmanager
async def cache(**kw):
    """A ChannelCache of fake channels and the list of those it made; closed on exit."""
    made = []

    def factory(key):
        made.append(Chan(key))
        return made[-1]

    c = ChannelCache(factory, **kw)
    try:
        yield c, made
    finally:
        await c.aclose()


async def settle():
    for _ in range(3):
        await asyncio.sleep(0)


async def test_3000_targets_stay_within_the_bound_and_evicted_channels_are_closed():
    async with cache(max_size=256) as (c, made):
        for i in range(3000):
            with c.lease(f"10.0.{i // 250}.{i % 250}:50000"):
                assert len(c) <= 256
        await settle()
        assert len(c) == 256 and len(made) == 3000
        assert sum(ch.closed for ch in made) == 3000 - 256
        assert all(ch.closed == 0 for ch in made[-256:])  # the most recent ones are cached
        st = c.stats()
        assert (st["evicted"], st["closed"], st["draining"], st["in_use"]) == (2744, 2744, 0, 0)
    assert all(ch.closed == 1 for ch in made)  # shutdown closes the rest, each channel once


async def test_reuse_and_least_recently_used_first_out():
    async with cache(max_size=2) as (c, made):
        with c.lease("a") as a:
            pass
        with c.lease("b"):
            pass
        with c.lease("a") as again:
            assert again is a  # cached
        with c.lease("c"):  # full: b (least recently used) goes
            pass
        await settle()
        assert "a" in c and "c" in c and "b" not in c
        assert [ch.key for ch in made if ch.closed] == ["b"]


async def test_an_idle_channel_is_evicted_before_a_busy_one():
    async with cache(max_size=2) as (c, _made):
        with c.lease("busy") as busy:
            with c.lease("idle"):
                pass
            with c.lease("new"):
                pass
            await settle()
            assert "busy" in c and "idle" not in c and not busy.closed


async def test_an_evicted_channel_under_a_call_closes_when_the_call_ends():
    async with cache(max_size=1) as (c, _made):
        with c.lease("a") as a:
            with c.lease("b") as b:  # every cached channel is busy: a leaves the cache anyway ...
                assert len(c) == 1 and "b" in c
                await settle()
                assert not a.closed  # ... but is not closed under the running call
                assert c.stats()["draining"] == 1 and c.stats()["in_use"] == 2
            await settle()
            assert not a.closed and not b.closed
        await settle()
        assert a.closed == 1 and not b.closed and c.stats()["draining"] == 0


async def test_idle_expiry_with_an_injected_clock():
    clock = ManualClock()
    async with cache(max_size=10, idle=300.0, clock=clock) as (c, made):
        with c.lease("old"):
            pass
        clock.t += 200
        with c.lease("recent"):
            pass
        with c.lease("long-call"):
            clock.t += 150  # "old" unused for 350 s, "recent" for 150 s, "long-call" in use
            assert c.sweep() == 1
            await settle()
            assert "old" not in c and made[0].closed == 1
            clock.t += 1000
            assert c.sweep() == 1  # "recent"; never the channel a call is using
            assert "long-call" in c
        # idle counts from the end of the last call
        clock.t += 299
        assert c.sweep() == 0 and "long-call" in c
        clock.t += 2
        assert c.sweep() == 1 and len(c) == 0
        await settle()
        assert all(ch.closed == 1 for ch in made) and c.stats()["expired"] == 3


async def test_the_sweeper_runs_by_itself():
    async with cache(idle=0.1) as (c, made):
        with c.lease("a"):
            pass
        async with asyncio.timeout(5):
            while not made[0].closed:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert len(c) == 0 and c.stats()["expired"] == 1


async def test_a_new_generation_replaces_the_channel_and_the_old_one_finishes_its_call():
    async with cache() as (c, _made):
        with c.lease("a", 1) as old:
            with c.lease("a", 2) as new:
                assert new is not old
            await settle()
            assert not old.closed
        await settle()
        assert old.closed == 1 and not new.closed and c.stats()["replaced"] == 1
        with c.lease("a", 2) as again:
            assert again is new


async def test_a_failing_call_still_returns_its_lease():
    async with cache(max_size=1) as (c, made):
        with pytest.raises(RuntimeError), c.lease("a"):
            raise RuntimeError("call failed")
        assert c.stats()["in_use"] == 0
        with c.lease("b"):
            pass
        await settle()
        assert made[0].closed == 1  # idle, so evicted and closed at once


def test_limits_are_checked():
    with pytest.raises(ValueError):
        ChannelCache(Chan, max_size=0)
    with pytest.raises(ValueError):
        ChannelCache(Chan, idle=0)

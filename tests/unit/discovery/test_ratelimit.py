from __future__ import annotations

import pytest

from discovery.server.ratelimit import RateLimiter
from spanutil.testing import ManualClock


def test_burst_then_wait() -> None:
    c = ManualClock(100.0)
    rl = RateLimiter(rate=1.0, burst=60, clock=c)
    assert all(rl.reserve("a") == 0.0 for _ in range(60))
    # upstream test: the 61st call at 1 req/s with a 1 s deadline... waits exactly 1 s
    assert rl.reserve("a", max_wait=0.5) is None
    assert rl.reserve("a", max_wait=1.0) == pytest.approx(1.0)
    # a refused reservation takes nothing; the granted one did
    assert rl.reserve("a", max_wait=10) == pytest.approx(2.0)


def test_keys_are_independent_and_refill() -> None:
    c = ManualClock(100.0)
    rl = RateLimiter(rate=15, burst=2, clock=c)
    assert rl.reserve("a") == 0 and rl.reserve("a") == 0
    assert rl.reserve("a", max_wait=0) is None
    assert rl.reserve("b") == 0
    c.t += 0.07
    assert rl.reserve("a", max_wait=0) == 0


def test_gc_forgets_idle_buckets_only() -> None:
    c = ManualClock(100.0)
    rl = RateLimiter(rate=1, burst=5, clock=c)
    rl.reserve("idle")
    for _ in range(5):
        rl.reserve("busy")
    c.t += 1.5
    assert rl.gc() == 1  # "idle" refilled to 5; "busy" has 1.5
    assert len(rl) == 1
    c.t += 10
    assert rl.gc() == 1 and len(rl) == 0


def test_disabled() -> None:
    rl = RateLimiter(rate=0, burst=0)
    assert not rl.enabled
    assert all(rl.reserve("x", max_wait=0) == 0 for _ in range(1000))


def test_bad_burst() -> None:
    with pytest.raises(ValueError, match="rate-burst"):
        RateLimiter(rate=1, burst=0)

"""A token bucket with an injected clock: the relay's per-allocation and per-relay rate limits."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; starts full. ``rate <= 0`` means unlimited.

    Time comes from the caller (``now``, seconds on a monotonic clock) so the bucket stays pure."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate > 0 and burst <= 0:
            raise ValueError(f"burst must be positive when rate is set, not {burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def take(self, cost: float, now: float) -> bool:
        """Spend ``cost`` tokens if there are enough; False (nothing spent) when over the limit."""
        if self.rate <= 0:
            return True
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True

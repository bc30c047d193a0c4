"""Per-client-IP token buckets (pure; injected clock).

Upstream semantics: a request *waits* for a token; it is refused only when the
wait would outlast the call's deadline. Idle buckets are garbage-collected.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class RateLimiter:
    """Token bucket per key: ``rate`` tokens per second, at most ``burst`` stored.

    ``rate <= 0`` disables limiting (every reservation is free).
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 and rate > 0:
            raise ValueError(f"rate-burst: {burst} must be at least 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def reserve(self, key: str, max_wait: float | None = None) -> float | None:
        """Take one token for ``key``; return how long the caller must wait before proceeding.

        Returns ``None`` (and takes nothing) when the wait would exceed ``max_wait``.
        """
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(self.burst, now)
        else:
            b.tokens = min(self.burst, b.tokens + (now - b.updated) * self.rate)
            b.updated = now
        wait = 0.0 if b.tokens >= 1.0 else (1.0 - b.tokens) / self.rate
        if max_wait is not None and wait > max_wait:
            return None
        b.tokens -= 1.0
        return wait

    def gc(self) -> int:
        """Forget buckets that have refilled completely (idle clients); return how many."""
        now = self._clock()
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.updated) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        return len(full)

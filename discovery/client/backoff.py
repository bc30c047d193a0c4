"""Jittered exponential backoff with upstream's parameters (cenkalti/backoff defaults, as the Go client uses).

Pure: the random source is injected, so schedules are testable. The interval starts at 0.5 s, grows x1.5
up to a 60 s cap, and each delay is drawn uniformly from ``interval ± 50 %``. The cap applies to the
interval, as upstream does; a drawn delay can therefore reach ``1.5 * 60 s``. Keeping the jitter at the cap
stops clients that lost the same server from reconnecting in lock-step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

INITIAL_INTERVAL = 0.5
MULTIPLIER = 1.5
RANDOMIZATION = 0.5
MAX_INTERVAL = 60.0


def jitter(interval: float, randomization: float, u: float) -> float:
    """Map ``u`` in [0, 1) onto ``[interval * (1 - r), interval * (1 + r))``."""
    delta = randomization * interval
    return interval - delta + u * 2.0 * delta


def next_interval(interval: float, multiplier: float, max_interval: float) -> float:
    """The interval after one more failure, capped at ``max_interval``."""
    return min(interval * multiplier, max_interval)


@dataclass(slots=True)
class ExponentialBackoff:
    """Stateful schedule: :meth:`next_delay` after each failure, :meth:`reset` after a success."""

    initial: float = INITIAL_INTERVAL
    multiplier: float = MULTIPLIER
    randomization: float = RANDOMIZATION
    max_interval: float = MAX_INTERVAL
    rand: Callable[[], float] = random.random
    _interval: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.initial <= 0:
            raise ValueError(f"backoff initial interval must be > 0, got {self.initial}")
        if self.multiplier < 1:
            raise ValueError(f"backoff multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.randomization < 1:
            raise ValueError(f"backoff randomization must be within [0, 1), got {self.randomization}")
        if self.max_interval < self.initial:
            raise ValueError(
                f"backoff max interval ({self.max_interval}) must be >= initial ({self.initial})"
            )
        self._interval = self.initial

    @property
    def interval(self) -> float:
        """The un-jittered interval the next delay is drawn around."""
        return self._interval

    def next_delay(self) -> float:
        """Draw the next delay and grow the interval."""
        delay = jitter(self._interval, self.randomization, self.rand())
        self._interval = next_interval(self._interval, self.multiplier, self.max_interval)
        return delay

    def reset(self) -> None:
        self._interval = self.initial


def schedule(n: int, rand: Callable[[], float], **params: float) -> list[float]:
    """The first ``n`` delays of a fresh :class:`ExponentialBackoff` (handy for tests and docs)."""
    b = ExponentialBackoff(rand=rand, **params)
    return [b.next_delay() for _ in range(n)]

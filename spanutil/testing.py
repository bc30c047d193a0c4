"""Test support for every layer's tests: wait for a condition another task brings about; a manual clock."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any


async def eventually(
    pred: Callable[[], Any], what: str = "", *, within: float = 10.0, every: float = 0.005
) -> Any:
    """Poll ``pred`` (a function; it may return an awaitable) every ``every`` seconds until its value
    is truthy, and return that value. Raises AssertionError naming ``what`` after ``within`` seconds
    (a bound against hanging, not a timing target)."""
    try:
        async with asyncio.timeout(within):
            while True:
                value = pred()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(every)
    except TimeoutError:
        raise AssertionError(f"not reached within {within:g} s: {what or pred}") from None


class ManualClock:
    """A clock to inject where code takes ``clock() -> float``: it reads ``t`` (seconds), which only the
    test moves (:meth:`advance`, or set ``t``)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

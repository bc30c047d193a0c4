"""Durations: one grammar for every flag and config field.

Go's ``time.ParseDuration`` without a sign (``1h2m3.5s``, ``500ms``, ``250us``, ``10ns``; units ``ns``,
``us``/``µs``/``μs``, ``ms``, ``s``, ``m``, ``h``, repeatable, in any order), plus a plain number of
seconds (``90``, ``1.5``, ``1e3``), plus an int or float value (from YAML). A duration is finite and
never negative.
"""

from __future__ import annotations

import argparse
import math
import re

__all__ = ["DurationError", "parse_duration"]

UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign
    "μs": 1e-6,  # U+03BC Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_SECONDS = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
EXAMPLES = "examples: 90s, 1m30s, 500ms, 2h, or plain seconds"


class DurationError(argparse.ArgumentTypeError, ValueError):
    """Not a duration. A ``ValueError``; also an ``ArgumentTypeError``, so argparse shows the message."""


def parse_duration(value: str | float) -> float:
    """Seconds from a duration (see the module docstring); :class:`DurationError` names the input."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DurationError(f"invalid duration {value!r}: not text or a number")
    if not isinstance(value, str):
        seconds = float(value)
    else:
        text = value.strip()
        if _SECONDS.fullmatch(text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            while pos < len(text):
                m = _PART.match(text, pos)
                if not m:
                    raise DurationError(f"invalid duration {value!r} ({EXAMPLES})")
                seconds += float(m[1]) * UNITS[m[2]]
                pos = m.end()
            if not text:
                raise DurationError(f"invalid duration {value!r}: empty ({EXAMPLES})")
    if not math.isfinite(seconds) or seconds < 0:
        raise DurationError(f"invalid duration {value!r}: must be finite and not negative")
    return seconds

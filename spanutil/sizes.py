"""Byte sizes: one grammar for every size flag (``65536``, ``64KiB``, ``64MiB``, ``1GiB``).

``K``/``M``/``G`` with or without ``B``/``iB`` are all binary (1024-based): a flag that says ``64MB`` means
the same as ``64MiB``. A size is a whole number of bytes, finite and never negative.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["SizeError", "parse_size"]

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
EXAMPLES = "examples: 65536, 64KiB, 64MiB"


class SizeError(argparse.ArgumentTypeError, ValueError):
    """Not a size. A ``ValueError``; also an ``ArgumentTypeError``, so argparse shows the message."""


def parse_size(text: str) -> int:
    """Bytes from a size (see the module docstring); :class:`SizeError` names the input."""
    if not isinstance(text, str):
        raise SizeError(f"invalid size {text!r}: not text")
    num = text.strip().rstrip("BbIi").rstrip()
    unit = num[-1:].lower() if num[-1:].isalpha() else ""
    if unit:
        num = num[:-1]
    try:
        value = float(num) * UNITS[unit]
    except (KeyError, ValueError):
        raise SizeError(f"invalid size {text!r} ({EXAMPLES})") from None
    if not math.isfinite(value) or value < 0:
        raise SizeError(f"invalid size {text!r}: must be finite and not negative")
    return int(value)

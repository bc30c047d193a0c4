"""HOST:PORT text: one grammar for flags, config fields and dial targets (pure).

``host:port`` and ``[ipv6]:port``; where the caller allows it, an empty host (``:port``, every
address). An unbracketed IPv6 address splits at its last colon (``::1:80`` is ``::1`` port 80), as
the per-module parsers this one replaced did. The port is ASCII digits in 1-65535 (0 too where the
caller allows an ephemeral port). Errors are :class:`HostPortError` naming what the value is for, the
value and the rule it broke.
"""

from __future__ import annotations

import argparse

__all__ = ["PORT_MAX", "HostPortError", "split_host_port", "split_listen"]

PORT_MAX = 65535


class HostPortError(argparse.ArgumentTypeError, ValueError):
    """Not HOST:PORT. A ``ValueError``; also an ``ArgumentTypeError``, so argparse shows the message
    (a flag's ``type=`` needs no wrapper). ``reason`` is the broken rule alone, for callers that
    name the field and the value themselves (configuration files)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def split_host_port(
    text: str, *, what: str = "address", empty_host: bool = False, port_zero: bool = False
) -> tuple[str, int]:
    """``(host, port)`` of ``text`` (brackets removed; the host is not resolved or checked)."""
    value = text.strip()
    low = 0 if port_zero else 1
    form = "HOST:PORT or [IPv6]:PORT" + (" or :PORT" if empty_host else "")

    def bad(why: str) -> HostPortError:
        return HostPortError(f"{what} {text!r}: {why} (expected {form}, port {low}-{PORT_MAX})", why)

    if value.startswith("["):
        host, closed, rest = value[1:].partition("]")
        if not closed or not rest.startswith(":"):
            raise bad("a bracketed host must be followed by :PORT")
        port = rest[1:]
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise bad("no port")
    if not host and not empty_host:
        raise bad("no host")
    if not (port.isascii() and port.isdigit()):
        raise bad(f"port {port!r} is not a number")
    if not low <= int(port) <= PORT_MAX:
        raise bad(f"port {int(port)} out of range")
    return host, int(port)


def split_listen(text: str, *, what: str = "listen address") -> tuple[str | None, int]:
    """A listen address: ``(None, port)`` for every address (``:P``, ``*:P``, ``[::]:P``), else
    ``(host, port)``; port 0 asks the kernel for a free one."""
    host, port = split_host_port(text, what=what, empty_host=True, port_zero=True)
    return (None if host in ("", "*", "::") else host), port

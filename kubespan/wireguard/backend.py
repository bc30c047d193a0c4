"""The WireGuard backend interface and the diff-and-apply step every backend shares.

A backend is an adapter over one WireGuard device: the kernel's (generic
netlink), wireguard-go's (UAPI socket) or an in-memory fake. It observes the
device and applies :mod:`kubespan.wireguard.diff` operations; it decides nothing and
compares nothing. The mesh engine diffs against its own observation and calls
``apply``; :func:`sync` (read, diff, apply) is for callers that keep no
observation of their own: one-shot tools and tests.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from kubespan.wireguard.diff import Op, diff_device
from kubespan.wireguard.types import DeviceConfig, ObservedDevice
from spanutil.logs import log_event

logger = logging.getLogger("kubespan.wireguard")


class WireGuardError(OSError):
    """Reading or configuring the device failed.

    ``errno`` carries the cause when there is one (``ENODEV``: no device,
    ``ECONNREFUSED``: nothing serves the UAPI socket, ``EADDRINUSE``: the
    listen port is taken, ``ETIMEDOUT``, ...). Messages never contain keys.
    """


@runtime_checkable
class WireGuardBackend(Protocol):
    """One WireGuard device, as the mesh engine sees it."""

    name: str  # "kernel" | "userspace" | "fake"

    async def ensure_device(self) -> None:
        """Make sure the device exists (create it or spawn its daemon); idempotent."""

    async def get(self) -> ObservedDevice | None:
        """The device as WireGuard reports it; None when it does not exist."""

    async def apply(self, ops: Sequence[Op]) -> None:
        """Execute ``ops`` in order; raise :class:`WireGuardError` on failure.

        Not transactional: when it raises, some operations may have been applied.
        An empty ``ops`` writes nothing.
        """

    async def close(self, remove: bool = False) -> None:
        """Stop supervising and release resources; also delete the device when ``remove``."""


async def sync(backend: WireGuardBackend, desired: DeviceConfig) -> list[Op]:
    """Bring the device to ``desired`` by applying only the difference.

    ``get`` → :func:`~kubespan.wireguard.diff.diff_device` → ``apply``. When nothing
    differs nothing is written and ``[]`` is returned. Sets are not
    transactional, so after a failed apply the device is read again and the
    remaining difference applied once more; a second failure propagates.

    Returns the operations that brought the device to ``desired``: the first
    diff when it applied (or turned out to have landed despite the error),
    else the re-computed one. Raises :class:`WireGuardError` with ``ENODEV``
    when the device does not exist (call ``ensure_device`` first).
    """
    observed = await backend.get()
    if observed is None:
        raise WireGuardError(errno.ENODEV, f"{backend.name} WireGuard device does not exist")
    ops = diff_device(desired, observed)
    if not ops:
        return []
    try:
        await backend.apply(ops)
        return ops
    except WireGuardError as first:
        log_event(
            logger,
            "wireguard apply failed, re-reading",
            logging.WARNING,
            backend=backend.name,
            ops=len(ops),
            errno=first.errno,
            error=first.strerror or str(first),
        )
        observed = await backend.get()
        if observed is None:
            raise
        retry = diff_device(desired, observed)
        if not retry:
            return ops
        await backend.apply(retry)
        log_event(logger, "wireguard apply retried", backend=backend.name, ops=len(retry))
        return retry

"""Test helpers for the API servicers: a fake gRPC servicer context and a client-side collector."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from .roles import ROLE_METADATA


class Aborted(Exception):
    """What :meth:`FakeContext.abort` raises (grpc.aio raises its own AbortError)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """The parts of ``grpc.aio.ServicerContext`` the servicers use. ``roles=None``: no ``talos-role``
    metadata (a direct local caller)."""

    def __init__(self, roles: Iterable[str] | None = None, metadata: Iterable[tuple[str, str]] = ()) -> None:
        md = list(metadata)
        if roles is not None:
            md += [(ROLE_METADATA, r) for r in roles]
        self._md = tuple(md)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._md

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Aborted(code, details)


async def collect(stream: AsyncIterator[Any], limit: int | None = None) -> list[Any]:
    """Items of a server-streaming handler (at most ``limit``)."""
    out = []
    async for item in stream:
        out.append(item)
        if limit is not None and len(out) >= limit:
            break
    return out

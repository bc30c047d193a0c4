"""The mesh condition services may require (pure), and adapters from the mesh engine's status.

The supervisor only sees :class:`MeshHealth` values.  machined feeds them either by pushing
(``Supervisor.set_mesh``) or by handing the supervisor an async iterable, for example
``poll_mesh(mesh.status)`` which turns the kubespan engine's ``status()`` into a stream of changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .spec import MeshMode, MeshRequirement


@dataclass(frozen=True, slots=True)
class MeshHealth:
    """What the supervisor knows about the mesh: is the engine up, how many known peers, how many up."""

    ready: bool  # the engine is running (identity loaded, first reconcile done)
    peers: int = 0  # known remote peers
    up: int = 0  # remote peers currently up
    down: tuple[str, ...] = ()  # labels of peers not up, for messages

    @classmethod
    def from_status(cls, status: Any) -> MeshHealth:
        """From a ``kubespan.engine.MeshStatus`` (duck-typed: ``.ready``, ``.peers[*].state/.label``)."""
        peers = tuple(getattr(status, "peers", ()) or ())
        up = [p for p in peers if str(getattr(p, "state", "")) == "up"]
        down = tuple(str(getattr(p, "label", "?")) for p in peers if str(getattr(p, "state", "")) != "up")
        return cls(ready=bool(getattr(status, "ready", False)), peers=len(peers), up=len(up), down=down)

    def describe(self) -> str:
        if not self.ready:
            return "mesh not ready"
        s = f"{self.up}/{self.peers} peers up"
        if self.down:
            shown = ", ".join(self.down[:5]) + (", …" if len(self.down) > 5 else "")
            s += f" (down: {shown})"
        return s


def mesh_condition(req: MeshRequirement, health: MeshHealth | None) -> tuple[bool, str]:
    """Does ``health`` satisfy ``req``?  Returns ``(ok, reason)``; the reason reads after "mesh: "."""
    if req.mode is MeshMode.NONE:
        return True, "not required"
    if health is None:
        return False, f"no mesh status yet (requires {req})"
    if not health.ready:
        return False, f"mesh not ready (requires {req})"
    if req.mode is MeshMode.READY:
        ok = health.up >= health.peers
        return ok, f"{health.describe()}, requires all"
    ok = health.up >= req.quorum
    return ok, f"{health.describe()}, requires at least {req.quorum}"


async def poll_mesh(
    get: Callable[[], Any],
    interval: float = 1.0,
    *,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> AsyncIterator[MeshHealth | None]:
    """Call ``get()`` (returning a ``MeshStatus``, a :class:`MeshHealth` or None; may be async) every
    ``interval`` seconds and yield the :class:`MeshHealth` whenever it changes.  An exception from
    ``get`` yields None (mesh unknown) until it answers again."""
    last: object = object()
    while True:
        try:
            value = get()
            if asyncio.iscoroutine(value):
                value = await value
            cur = value if value is None or isinstance(value, MeshHealth) else MeshHealth.from_status(value)
        except Exception:
            cur = None
        if cur != last:
            last = cur
            yield cur
        await sleep(interval)

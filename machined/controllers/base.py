"""Helpers shared by machined's controllers."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from machined.runtime import ControllerContext
from machined.state import Resource


def rfc3339(ts: float | None) -> str | None:
    """Unix time as RFC 3339 UTC (second precision), None stays None."""
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Outputs:
    """Writes one output type of a controller, skipping specs equal to what it wrote last time.

    Specs are plain data (dicts of scalars and lists): they are compared, and the state copies them
    on write. :meth:`put` marks the resource as produced in this run either way, so
    :meth:`cleanup` removes exactly what the run did not produce.
    """

    def __init__(self, namespace: str, type: str) -> None:
        self.namespace = namespace
        self.type = type
        self._last: dict[str, tuple[Any, Mapping[str, str] | None]] = {}
        self._swept = False  # a full cleanup ran once (removing what an earlier incarnation left)

    async def put(
        self, ctx: ControllerContext, id: str, spec: Any, labels: Mapping[str, str] | None = None
    ) -> None:
        want = (spec, dict(labels) if labels else None)
        if self._last.get(id) == want:
            ctx.keep(self.namespace, self.type, id)
            return

        def apply(r: Resource) -> None:
            r.spec = spec
            r.metadata.labels = dict(labels) if labels else {}

        await ctx.modify(Resource.new(self.namespace, self.type, id, spec, labels=labels), apply)
        self._last[id] = want

    def keep_all(self, ctx: ControllerContext) -> None:
        """Mark everything written last time as produced again (inputs unchanged)."""
        for id in self._last:
            ctx.keep(self.namespace, self.type, id)

    async def cleanup(self, ctx: ControllerContext) -> int:
        """Remove this controller's outputs of this type that the run did not produce. Skipped (no
        state scan) when the run produced everything written before: nothing can be stale then."""
        touched = {id for ns, t, id in ctx.touched if ns == self.namespace and t == self.type}
        if self._swept and all(id in touched for id in self._last):
            return 0
        n = await ctx.cleanup_outputs(self.type, namespace=self.namespace)
        self._swept = True
        for id in list(self._last):
            if id not in touched:
                del self._last[id]
        return n

    def forget(self) -> None:
        self._last.clear()
        self._swept = False

"""The view of the state a controller gets during one run.

Reads are allowed on declared inputs (an input with an id allows only that
id) and on the controller's own output types; writes only on output types,
always as the controller (the owner). Anything else raises
:class:`AccessError` naming the controller and the type.

Every output written in this run (``create``, ``update``, ``modify`` - even
a no-op - and ``keep``) is remembered, so :meth:`cleanup_outputs` can remove
the outputs this controller owns but did not produce this time, as Talos's
level-triggered controllers do.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from machined.state import Phase, Resource, State
from machined.state.query import LabelQuery
from machined.state.state import ModifyFn

from .controller import AccessError, Input, InputKind, Output, WakeReason

Labels = LabelQuery | dict[str, str] | str | None


class ControllerContext:
    """Reads inputs, writes outputs, tracks what was written this run."""

    def __init__(
        self,
        name: str,
        state: State,
        inputs: Sequence[Input],
        outputs: Sequence[Output],
        reason: WakeReason,
        logger: logging.Logger,
    ) -> None:
        self.name = name
        self.reason = reason
        self.logger = logger
        self._state = state
        self._inputs = tuple(inputs)
        self._out_types = frozenset(o.type for o in outputs)
        self.touched: set[tuple[str, str, str]] = set()

    # ------------------------------------------------------------ access checks

    def _check_read(self, namespace: str, type: str, id: str | None) -> None:
        if type in self._out_types:
            return
        if any(i.covers(namespace, type, id) for i in self._inputs):
            return
        what = f"{namespace}/{type}" + (f"/{id}" if id else "")
        raise AccessError(f"controller {self.name!r} may not read {what}: not a declared input or output")

    def _check_write(self, type: str) -> None:
        if type not in self._out_types:
            raise AccessError(f"controller {self.name!r} may not write {type}: not a declared output")

    def _check_strong(self, namespace: str, type: str, id: str) -> None:
        if not any(i.kind is InputKind.STRONG and i.covers(namespace, type, id) for i in self._inputs):
            raise AccessError(
                f"controller {self.name!r} may not put finalizers on {namespace}/{type}/{id}: not a strong input"
            )

    # -------------------------------------------------------------------- reads

    async def get(self, namespace: str, type: str, id: str) -> Resource:
        self._check_read(namespace, type, id)
        return await self._state.get(namespace, type, id)

    async def find(self, namespace: str, type: str, id: str) -> Resource | None:
        self._check_read(namespace, type, id)
        return await self._state.find(namespace, type, id)

    async def list(
        self,
        namespace: str,
        type: str,
        *,
        labels: Labels = None,
        id_regexp: str | re.Pattern[str] | None = None,
    ) -> list[Resource]:
        self._check_read(namespace, type, None)
        return await self._state.list(namespace, type, labels=labels, id_regexp=id_regexp)

    # ------------------------------------------------------------------- writes

    def keep(self, namespace: str, type: str, id: str) -> None:
        """Mark an output as produced this run without writing it (protects it from cleanup)."""
        self._check_write(type)
        self.touched.add((namespace, type, id))

    async def create(self, resource: Resource) -> Resource:
        md = resource.metadata
        self._check_write(md.type)
        out = await self._state.create(resource, owner=self.name)
        self.touched.add((md.namespace, md.type, md.id))
        return out

    async def update(self, resource: Resource) -> Resource:
        md = resource.metadata
        self._check_write(md.type)
        out = await self._state.update(resource, owner=self.name)
        self.touched.add((md.namespace, md.type, md.id))
        return out

    async def modify(self, template: Resource, fn: ModifyFn) -> Resource:
        """Create or update an output (see :meth:`State.modify`); equal results write nothing."""
        md = template.metadata
        self._check_write(md.type)
        out = await self._state.modify(template, fn, owner=self.name)
        self.touched.add((md.namespace, md.type, md.id))
        return out

    async def destroy(self, namespace: str, type: str, id: str) -> None:
        self._check_write(type)
        await self._state.destroy(namespace, type, id, owner=self.name)

    async def teardown(self, namespace: str, type: str, id: str) -> bool:
        self._check_write(type)
        return await self._state.teardown(namespace, type, id, owner=self.name)

    async def add_finalizer(self, namespace: str, type: str, id: str) -> None:
        """Block the destruction of a strong input with a finalizer named after this controller."""
        self._check_strong(namespace, type, id)
        await self._state.add_finalizer(namespace, type, id, self.name)

    async def remove_finalizer(self, namespace: str, type: str, id: str) -> None:
        self._check_strong(namespace, type, id)
        await self._state.remove_finalizer(namespace, type, id, self.name)

    async def cleanup_outputs(self, *types: str, namespace: str | None = None) -> int:
        """Remove this controller's outputs (of ``types``, default: all) not written in this run.

        Outputs with finalizers are torn down instead (and destroyed by a
        later run once released). Returns the number destroyed.
        """
        for t in types:
            self._check_write(t)
        destroyed = 0
        for t in types or sorted(self._out_types):
            for ns, _ in self._state.collections(t):
                if namespace is not None and ns != namespace:
                    continue
                for r in await self._state.list(ns, t):
                    md = r.metadata
                    if md.owner != self.name or (ns, t, md.id) in self.touched:
                        continue
                    if md.finalizers:
                        if md.phase is Phase.RUNNING:
                            await self._state.teardown(ns, t, md.id, owner=self.name)
                        continue
                    await self._state.destroy(ns, t, md.id, owner=self.name)
                    destroyed += 1
        return destroyed

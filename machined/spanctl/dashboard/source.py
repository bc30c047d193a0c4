"""What the page server reads from a collector: a versioned view and a change event.

:class:`ViewSource` holds the parts both collectors (apid watches, agents' ``/status``) share; each
subclass says how its nodes become the view model's input (:meth:`ViewSource.node_inputs`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from . import model


class ViewSource:
    """``version`` grows on every change and ``event`` fires once for it; ``current()`` serializes
    the view once per version however many pages read it (it is :meth:`view` as of that version)."""

    def __init__(self, clock: Callable[[], float], link: dict[str, Any]) -> None:
        self.clock = clock
        self.history: dict[tuple[str, str], list[model.HistoryEntry]] = {}
        self.link = link
        self.version = 0
        self.event = asyncio.Event()
        self._view: tuple[int, dict[str, Any], str] = (-1, {}, "")

    def node_inputs(self) -> list[model.NodeInput]:
        raise NotImplementedError

    def changed(self) -> None:
        self.version += 1
        old, self.event = self.event, asyncio.Event()
        old.set()

    def view(self) -> dict[str, Any]:
        return model.build_view(self.node_inputs(), self.history, self.clock(), link=self.link)

    def current(self) -> tuple[int, dict[str, Any], str]:
        """The current view (version, dict, JSON)."""
        if self._view[0] != self.version:
            v = self.view()
            self._view = (self.version, v, json.dumps(v, separators=(",", ":")))
        return self._view

    def view_json(self) -> str:
        return self.current()[2]

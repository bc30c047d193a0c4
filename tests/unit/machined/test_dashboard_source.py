"""ViewSource: the once-per-version serialized view equals the view built afresh."""

from __future__ import annotations

import asyncio
import json

from machined.spanctl.dashboard import model
from machined.spanctl.dashboard.source import ViewSource


class Nodes(ViewSource):
    def __init__(self) -> None:
        super().__init__(lambda: 1000.0, {"ok": True, "state": "agents", "error": "", "since": 0.0})
        self.inputs: list[model.NodeInput] = []

    def node_inputs(self) -> list[model.NodeInput]:
        return list(self.inputs)


async def test_current_is_the_fresh_view_after_every_change() -> None:
    src = Nodes()
    seen = []
    for name in ("a", "b", "c"):
        event = src.event
        src.inputs.append(model.NodeInput(name, name, model.REACH_UNREACHABLE, "gone"))
        src.changed()
        assert event.is_set() and not src.event.is_set()  # one event per change
        version, view, text = src.current()
        assert version == src.version and view == src.view() and json.loads(text) == src.view()
        assert src.current() is src.current()  # built once per version
        seen.append(len(view["nodes"]))
    assert seen == [1, 2, 3]


def test_an_unchanged_version_keeps_its_view_until_changed() -> None:
    src = Nodes()
    first = src.current()
    src.inputs.append(model.NodeInput("a", "a"))
    assert src.current() is first  # no change announced: the same view
    src.changed()
    assert src.current()[1] == src.view() != first[1]


def test_event_is_an_asyncio_event() -> None:
    assert isinstance(Nodes().event, asyncio.Event)

"""Supervisor.replace, the hook the agent uses to restart a service with a changed definition."""

from __future__ import annotations

import asyncio

import pytest

from machined.services import Service, ServiceConfigError, ServiceState, Supervisor
from machined.services.fake import FakeSpawner


async def test_replace_swaps_a_stopped_definition_and_keeps_history():
    sp = FakeSpawner()
    async with Supervisor(
        [Service("a", ("a",)), Service("b", ("b", "--v1"), depends_on=("a",))], spawner=sp
    ) as sup:
        await sup.start_all()
        async with asyncio.timeout(5):
            await sup.wait_state("b", ServiceState.RUNNING)
        sup.logs("b").append("kept")
        with pytest.raises(RuntimeError, match="stop it before replacing"):
            sup.replace(Service("b", ("b", "--v2"), depends_on=("a",)))
        await sup.stop("b", dependents=False)
        events_before = len(sup.status("b").events)
        sup.replace(Service("b", ("b", "--v2"), depends_on=("a",)))
        await sup.start("b")
        async with asyncio.timeout(5):
            await sup.wait_state("b", ServiceState.RUNNING)
        assert sp.of("b")[-1].cmd.argv == ("b", "--v2")
        assert len(sup.status("b").events) > events_before
        assert [line.text for line in sup.logs("b").tail()] == ["kept"]
        await sup.stop("b", dependents=False)
        sup.replace(Service("b", ("b",), depends_on=("a",), log_lines=10))
        assert sup.logs("b").tail() == []  # new log settings: a new ring
        with pytest.raises(ServiceConfigError, match="unknown service"):
            sup.replace(Service("b", ("b",), depends_on=("zzz",)))
        with pytest.raises(ServiceConfigError, match="cycle"):
            await sup.stop("a")
            sup.replace(Service("a", ("a",), depends_on=("b",)))

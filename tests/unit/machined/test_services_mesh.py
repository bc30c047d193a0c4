"""The mesh condition (pure) and the adapters from the engine's status."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from machined.services import MeshHealth, MeshMode, MeshRequirement, mesh_condition, poll_mesh

READY = MeshRequirement(MeshMode.READY)
Q2 = MeshRequirement(MeshMode.QUORUM, 2)


def test_none_always_holds():
    assert mesh_condition(MeshRequirement(), None)[0]


def test_unknown_or_not_ready_mesh_holds_for_nothing():
    ok, why = mesh_condition(READY, None)
    assert not ok and "no mesh status" in why
    ok, why = mesh_condition(Q2, MeshHealth(ready=False, peers=3, up=3))
    assert not ok and "not ready" in why


def test_ready_needs_every_known_peer_up():
    assert mesh_condition(READY, MeshHealth(True, peers=3, up=3))[0]
    ok, why = mesh_condition(READY, MeshHealth(True, peers=3, up=2, down=("n3",)))
    assert not ok
    assert why == "2/3 peers up (down: n3), requires all"
    assert mesh_condition(READY, MeshHealth(True, peers=0, up=0))[0]  # alone: vacuously ready


def test_quorum_counts_remote_peers_up():
    assert not mesh_condition(Q2, MeshHealth(True, peers=4, up=1))[0]
    assert mesh_condition(Q2, MeshHealth(True, peers=4, up=2))[0]
    assert "requires at least 2" in mesh_condition(Q2, MeshHealth(True, peers=4, up=1))[1]


def test_from_engine_status():
    status = SimpleNamespace(
        ready=True,
        peers=(
            SimpleNamespace(label="a", state="up"),
            SimpleNamespace(label="b", state="down"),
            SimpleNamespace(label="c", state="unknown"),
        ),
    )
    assert MeshHealth.from_status(status) == MeshHealth(True, peers=3, up=1, down=("b", "c"))


async def test_poll_mesh_yields_changes_only_and_unknown_on_errors():
    values = [
        SimpleNamespace(ready=False, peers=()),
        SimpleNamespace(ready=False, peers=()),
        RuntimeError("engine not started"),
        MeshHealth(True, 1, 1),
        MeshHealth(True, 1, 1),
        MeshHealth(True, 1, 0, ("x",)),
    ]

    def get():
        v = values.pop(0)
        if isinstance(v, Exception):
            raise v
        return v

    async def no_sleep(_):
        await asyncio.sleep(0)

    got = []
    async with asyncio.timeout(2):
        async for h in poll_mesh(get, 1.0, sleep=no_sleep):
            got.append(h)
            if len(got) == 4:
                break
    assert got == [MeshHealth(False), None, MeshHealth(True, 1, 1), MeshHealth(True, 1, 0, ("x",))]

"""What a controller may read and write during a run; output cleanup; stats for a status resource."""

from __future__ import annotations

import logging

import pytest

from machined.runtime import (
    AccessError,
    Backoff,
    Controller,
    ControllerContext,
    Input,
    Output,
    OutputKind,
    Runtime,
    WakeReason,
    strong,
    weak,
)
from machined.state import FinalizersPendingError, OwnerConflictError, Phase, Resource, State
from spanutil.testing import eventually

NS = "test"
IN = "Inputs.test.dev"
OUT = "Outputs.test.dev"
OTHER = "Others.test.dev"


def ctx_for(state: State, inputs=(), outputs=(), name: str = "ctl") -> ControllerContext:
    return ControllerContext(name, state, inputs, outputs, WakeReason.START, logging.getLogger("t"))


async def test_writes_are_limited_to_declared_outputs_and_owned_by_the_controller():
    state = State()
    ctx = ctx_for(state, inputs=[weak(NS, IN)], outputs=[Output(OUT)])
    await ctx.create(Resource.new(NS, OUT, "o", {"x": 1}))
    assert (await state.get(NS, OUT, "o")).metadata.owner == "ctl"
    with pytest.raises(AccessError, match=r"'ctl' may not write Inputs\.test\.dev: not a declared output"):
        await ctx.create(Resource.new(NS, IN, "i", {}))
    with pytest.raises(AccessError, match="may not write"):
        await ctx.modify(Resource.new(NS, OTHER, "x"), lambda r: None)
    with pytest.raises(AccessError):
        await ctx.destroy(NS, IN, "i")
    with pytest.raises(AccessError):
        ctx.keep(NS, OTHER, "x")
    assert await state.list(NS, IN) == [] and await state.list(NS, OTHER) == []


async def test_reads_are_limited_to_inputs_and_outputs():
    state = State()
    for t, id in ((IN, "a"), (IN, "b"), (OTHER, "z")):
        await state.create(Resource.new(NS, t, id, {}), owner="user")
    ctx = ctx_for(state, inputs=[weak(NS, IN, "a")], outputs=[Output(OUT)])
    assert (await ctx.get(NS, IN, "a")).id == "a"
    with pytest.raises(AccessError, match=r"may not read test/Inputs\.test\.dev/b"):
        await ctx.get(NS, IN, "b")  # the input names one id
    with pytest.raises(AccessError, match="may not read"):
        await ctx.list(NS, IN)
    with pytest.raises(AccessError):
        await ctx.find(NS, OTHER, "z")
    with pytest.raises(AccessError):
        await ctx.get("elsewhere", IN, "a")
    assert await ctx.list("any-namespace", OUT) == []  # own outputs are readable anywhere


async def test_an_undeclared_write_in_reconcile_is_a_counted_failure():
    state = State()

    class Sneaky(Controller):
        name = "sneaky"
        outputs = (Output(OUT),)

        async def reconcile(self, ctx) -> None:
            await ctx.create(Resource.new(NS, OTHER, "x", {}))

    async with Runtime(state, backoff=Backoff(0.01, 0.01)) as rt:
        rt.register(Sneaky())
        await eventually(lambda: rt.stats()["sneaky"].failures >= 1)
    st = rt.stats()["sneaky"]
    assert st.last_error.startswith("AccessError: controller 'sneaky' may not write Others.test.dev")
    assert await state.list(NS, OTHER) == []


async def test_shared_outputs_still_have_one_owner_per_resource():
    state = State()
    a = ctx_for(state, outputs=[Output(OUT, OutputKind.SHARED)], name="a")
    b = ctx_for(state, outputs=[Output(OUT, OutputKind.SHARED)], name="b")
    await a.create(Resource.new(NS, OUT, "from-a", {"v": 1}))
    await b.create(Resource.new(NS, OUT, "from-b", {"v": 1}))
    with pytest.raises(OwnerConflictError, match="owned by 'a'"):
        await b.modify(Resource.new(NS, OUT, "from-a"), lambda r: r.spec.update(v=2))
    with pytest.raises(OwnerConflictError):
        await b.destroy(NS, OUT, "from-a")
    # b's next run writes nothing: its cleanup removes its own resource, never a's
    b_next = ctx_for(state, outputs=[Output(OUT, OutputKind.SHARED)], name="b")
    assert await b_next.cleanup_outputs() == 1
    assert [r.id for r in await state.list(NS, OUT)] == ["from-a"]


async def test_finalizers_only_on_strong_inputs_and_they_block_destroy():
    state = State()
    await state.create(Resource.new(NS, IN, "i", {}), owner="user")
    await state.create(Resource.new(NS, OTHER, "w", {}), owner="user")
    ctx = ctx_for(state, inputs=[strong(NS, IN), Input(NS, OTHER)])
    await ctx.add_finalizer(NS, IN, "i")
    with pytest.raises(AccessError, match="not a strong input"):
        await ctx.add_finalizer(NS, OTHER, "w")
    assert await state.teardown(NS, IN, "i", owner="user") is False
    with pytest.raises(FinalizersPendingError, match="ctl"):
        await state.destroy(NS, IN, "i", owner="user")
    await ctx.remove_finalizer(NS, IN, "i")
    await state.destroy(NS, IN, "i", owner="user")


class Mirror(Controller):
    """OUT/<id> for every IN/<id>; everything else it owns is cleaned up."""

    name = "mirror"
    inputs = (weak(NS, IN),)
    outputs = (Output(OUT),)

    def __init__(self) -> None:
        self.cleaned: list[int] = []

    async def reconcile(self, ctx) -> None:
        for r in await ctx.list(NS, IN):
            v = r.spec["v"]
            await ctx.modify(Resource.new(NS, OUT, r.id), lambda o, v=v: o.spec.update(v=v))
        self.cleaned.append(await ctx.cleanup_outputs())


async def test_cleanup_removes_outputs_not_written_in_this_run():
    state = State()
    m = Mirror()
    for id in "abc":
        await state.create(Resource.new(NS, IN, id, {"v": 1}), owner="user")

    async def outputs() -> list[str]:
        return [r.id for r in await state.list(NS, OUT)]

    async def until(want: list[str]) -> None:
        async def done() -> bool:
            return await outputs() == want

        await eventually(done)

    async with Runtime(state) as rt:
        rt.register(m)
        await until(["a", "b", "c"])
        await state.destroy(NS, IN, "b", owner="user")
        await until(["a", "c"])
        # an output someone holds a finalizer on is torn down, not destroyed
        await state.add_finalizer(NS, OUT, "c", "consumer")
        await state.destroy(NS, IN, "c", owner="user")

        async def torn_down() -> bool:
            return (await state.get(NS, OUT, "c")).metadata.phase is Phase.TEARING_DOWN

        await eventually(torn_down)
        await state.remove_finalizer(NS, OUT, "c", "consumer")  # the release wakes nobody: no OUT input
        rt.wake("mirror")
        await until(["a"])
    assert sum(m.cleaned) == 2


async def test_keep_protects_an_output_from_cleanup():
    state = State()
    ctx = ctx_for(state, outputs=[Output(OUT)])
    await ctx.create(Resource.new(NS, OUT, "x", {}))
    await ctx.create(Resource.new(NS, OUT, "y", {}))
    later = ctx_for(state, outputs=[Output(OUT)])
    later.keep(NS, OUT, "x")
    assert await later.cleanup_outputs(OUT) == 1
    assert [r.id for r in await state.list(NS, OUT)] == ["x"]
    with pytest.raises(AccessError):
        await later.cleanup_outputs(IN)


async def test_stats_render_for_a_status_resource():
    state = State()

    class Once(Controller):
        name = "once"

        async def reconcile(self, ctx) -> None:
            pass

    async with Runtime(state) as rt:
        rt.register(Once())
        await eventually(lambda: rt.stats()["once"].runs >= 1)
        data = rt.stats()["once"].to_data()
    assert data["name"] == "once" and data["runs"] == 1 and data["failures"] == 0
    assert (
        data["lastReason"] == "start" and data["lastError"] == "" and data["lastSuccess"] == data["lastRun"]
    )
    # a status resource built from it renders as YAML
    r = Resource.new("runtime", "ControllerStatuses.runtime.talos.dev", "once", data)
    assert "runs: 1" in r.yaml_spec

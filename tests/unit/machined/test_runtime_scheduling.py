"""Controller runtime scheduling: wake on input change, coalescing, crash isolation and backoff, timers."""

from __future__ import annotations

import asyncio
import logging

import pytest

from machined.runtime import (
    Backoff,
    Controller,
    Input,
    Output,
    RegistrationError,
    Runtime,
    WakeReason,
)
from machined.runtime.controller import OutputKind
from machined.state import Resource, State
from spanutil.testing import eventually

NS = "test"
IN = "Inputs.test.dev"
OUT = "Outputs.test.dev"


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class Summer(Controller):
    """OUT/sum = sum of every IN's spec["v"]."""

    name = "summer"
    inputs = (Input(NS, IN),)
    outputs = (Output(OUT),)

    def __init__(self) -> None:
        self.reasons: list[WakeReason] = []
        self.gate: asyncio.Event | None = None
        self.seen: list[int] = []

    async def reconcile(self, ctx) -> None:
        self.reasons.append(ctx.reason)
        total = sum(r.spec["v"] for r in await ctx.list(NS, IN))
        self.seen.append(total)
        if self.gate is not None:
            await self.gate.wait()
        await ctx.modify(Resource.new(NS, OUT, "sum"), lambda r: r.spec.update(total=total))


async def out_total(state: State) -> int | None:
    r = await state.find(NS, OUT, "sum")
    return None if r is None else r.spec["total"]


async def put(state: State, id: str, v: int) -> None:
    r = await state.find(NS, IN, id)
    if r is None:
        await state.create(Resource.new(NS, IN, id, {"v": v}), owner="user")
    else:
        r.spec["v"] = v
        await state.update(r, owner="user")


async def test_controller_runs_at_start_and_on_every_input_change():
    state = State()
    await put(state, "a", 1)
    c = Summer()
    async with Runtime(state) as rt:
        rt.register(c)  # registered while running: starts at once
        await eventually(lambda: out_total(state))
        assert await out_total(state) == 1
        await put(state, "b", 2)
        await eventually(lambda: _eq(out_total(state), 3))
        await put(state, "a", 10)
        await eventually(lambda: _eq(out_total(state), 12))
        await state.destroy(NS, IN, "b", owner="user")
        await eventually(lambda: _eq(out_total(state), 10))
        assert c.reasons[0] is WakeReason.START and set(c.reasons[1:]) == {WakeReason.INPUT}
        st = rt.stats()["summer"]
        assert st.runs == len(c.reasons) and st.failures == 0 and st.state == "idle"
    assert rt.stats()["summer"].state == "stopped"


async def _eq(aw, want) -> bool:
    return (await aw) == want


async def test_only_matching_inputs_wake_a_controller():
    state = State()
    runs: list[str] = []

    class One(Controller):
        name = "one"
        inputs = (Input(NS, IN, id="x"),)
        outputs = ()

        async def reconcile(self, ctx) -> None:
            runs.append(ctx.reason)

    async with Runtime(state) as rt:
        rt.register(One())
        await eventually(lambda: runs == [WakeReason.START])
        await put(state, "y", 1)  # another id of the same type
        await state.create(Resource.new(NS, OUT, "z", {}), owner="user")  # another type
        await state.create(Resource.new("elsewhere", IN, "x", {}), owner="user")  # another namespace
        await asyncio.sleep(0.05)
        assert runs == [WakeReason.START]
        await put(state, "x", 1)
        await eventually(lambda: len(runs) == 2)


async def test_a_burst_before_the_controller_runs_coalesces_into_one_run():
    state = State()
    c = Summer()
    async with Runtime(state) as rt:
        rt.register(c)
        await eventually(lambda: len(c.reasons) == 1)
        await settle()
        for i in range(200):  # no await in between that yields: one burst
            await put(state, f"r{i}", 1)
        await eventually(lambda: _eq(out_total(state), 200))
        await asyncio.sleep(0.05)
        assert c.reasons == [WakeReason.START, WakeReason.INPUT]
        assert rt.stats()["summer"].runs == 2


async def test_changes_during_a_run_cause_exactly_one_more_run():
    state = State()
    c = Summer()
    c.gate = asyncio.Event()
    async with Runtime(state) as rt:
        rt.register(c)
        await eventually(lambda: len(c.reasons) == 1)  # first run is blocked on the gate
        for v in range(1, 51):
            await put(state, "a", v)
            await asyncio.sleep(0)  # let the runtime see each change separately
        c.gate.set()
        await eventually(lambda: _eq(out_total(state), 50))
        await asyncio.sleep(0.05)
        assert len(c.reasons) == 2 and c.seen == [0, 50]


async def test_crash_is_isolated_logged_and_retried_with_exponential_backoff(caplog):
    state = State()
    delays: list[float] = []

    async def fake_sleep(d: float) -> None:
        delays.append(d)
        await asyncio.sleep(0)

    class Flaky(Controller):
        name = "flaky"
        inputs = (Input(NS, IN),)
        outputs = ()
        calls = 0
        fail_next = 3

        async def reconcile(self, ctx) -> None:
            Flaky.calls += 1
            if Flaky.fail_next:
                Flaky.fail_next -= 1
                raise RuntimeError(f"boom {Flaky.calls}")

    good = Summer()
    caplog.set_level(logging.ERROR, logger="controller-runtime")
    async with Runtime(state, backoff=Backoff(initial=0.1, maximum=0.3, factor=2), sleep=fake_sleep) as rt:
        rt.register(Flaky())
        rt.register(good)
        await eventually(lambda: Flaky.calls == 4)
        assert delays == [0.1, 0.2, 0.3]  # exponential, capped
        st = rt.stats()["flaky"]
        assert (st.runs, st.failures, st.consecutive_failures) == (4, 3, 0)
        assert st.last_error == "RuntimeError: boom 3" and st.last_reason == "retry"
        # a new failure series starts from the initial delay again
        Flaky.fail_next = 1
        await put(state, "a", 5)
        await eventually(lambda: Flaky.calls == 6)
        assert delays == [0.1, 0.2, 0.3, 0.1]
        # the other controller was never disturbed
        await eventually(lambda: _eq(out_total(state), 5))
        assert rt.stats()["summer"].failures == 0
    errors = [r for r in caplog.records if r.name == "controller-runtime" and r.levelno == logging.ERROR]
    assert len(errors) == 4 and "flaky" in errors[0].getMessage() and errors[0].exc_info is not None


async def test_a_controller_failing_forever_does_not_stop_the_others():
    state = State()

    class Broken(Controller):
        name = "broken"
        inputs = (Input(NS, IN),)
        outputs = ()

        async def reconcile(self, ctx) -> None:
            raise ValueError("always")

    good = Summer()
    async with Runtime(state, backoff=Backoff(initial=0.005, maximum=0.02)) as rt:
        rt.register(Broken())
        rt.register(good)
        for v in range(5):
            await put(state, "a", v)
            await eventually(lambda v=v: _eq(out_total(state), v))
        assert rt.stats()["broken"].failures >= 2
        assert rt.stats()["broken"].last_error == "ValueError: always"


async def test_periodic_timer_runs_without_input_changes():
    state = State()
    reasons: list[WakeReason] = []

    class Ticker(Controller):
        name = "ticker"
        inputs = (Input(NS, IN),)
        outputs = ()
        interval = 0.03

        async def reconcile(self, ctx) -> None:
            reasons.append(ctx.reason)

    async with Runtime(state) as rt:
        rt.register(Ticker())
        await eventually(lambda: reasons.count(WakeReason.TIMER) >= 3, within=2)
        await put(state, "a", 1)
        await eventually(lambda: WakeReason.INPUT in reasons)
        n = reasons.count(WakeReason.TIMER)
        await eventually(lambda: reasons.count(WakeReason.TIMER) >= n + 2, within=2)
    assert reasons[0] is WakeReason.START


async def test_manual_wake():
    state = State()
    reasons: list[WakeReason] = []

    class Quiet(Controller):
        name = "quiet"

        async def reconcile(self, ctx) -> None:
            reasons.append(ctx.reason)

    async with Runtime(state) as rt:
        rt.register(Quiet())
        await eventually(lambda: reasons == [WakeReason.START])
        rt.wake("quiet")
        await eventually(lambda: reasons == [WakeReason.START, WakeReason.MANUAL])


async def test_runtime_recovers_when_its_own_watch_falls_behind(caplog):
    state = State()
    c = Summer()
    async with Runtime(state, watch_queue_size=2) as rt:
        rt.register(c)
        await eventually(lambda: len(c.reasons) == 1)
        for i in range(20):  # overflows the runtime's watch of IN
            await put(state, f"r{i}", 1)
        await eventually(lambda: _eq(out_total(state), 20))
        await put(state, "late", 5)  # and it keeps watching afterwards
        await eventually(lambda: _eq(out_total(state), 25))
    assert any("fell behind" in r.getMessage() for r in caplog.records)


def test_registration_rules():
    rt = Runtime(State())

    def ctrl(name: str, *outputs: Output, interval: float | None = None) -> Controller:
        c = Controller()
        c.name, c.outputs, c.interval = name, outputs, interval
        return c

    rt.register(ctrl("a", Output(OUT)))
    with pytest.raises(RegistrationError, match="already registered"):
        rt.register(ctrl("a"))
    with pytest.raises(RegistrationError, match=r"clashes with controller 'a'.*exactly one writer"):
        rt.register(ctrl("b", Output(OUT)))
    with pytest.raises(RegistrationError, match="clashes"):
        rt.register(ctrl("b", Output(OUT, OutputKind.SHARED)))
    rt.register(ctrl("s1", Output("Shared.test.dev", OutputKind.SHARED)))
    rt.register(ctrl("s2", Output("Shared.test.dev", OutputKind.SHARED)))
    with pytest.raises(RegistrationError, match="clashes"):
        rt.register(ctrl("s3", Output("Shared.test.dev")))
    with pytest.raises(RegistrationError, match="no name"):
        rt.register(ctrl(""))
    with pytest.raises(RegistrationError, match="interval"):
        rt.register(ctrl("t", interval=0))
    deps = {(d.controller, d.direction, d.type, d.kind) for d in rt.dependencies()}
    assert ("a", "output", OUT, "exclusive") in deps and ("s2", "output", "Shared.test.dev", "shared") in deps


def test_backoff_sequence():
    b = Backoff(initial=0.5, maximum=4, factor=3)
    assert [b.delay(n) for n in range(5)] == [0.0, 0.5, 1.5, 4, 4]

"""The supervisor's state machine with fake processes and a fake clock."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest

from machined.services import (
    Backoff,
    EventKind,
    HealthCheck,
    MeshHealth,
    RestartPolicy,
    Service,
    ServiceConfigError,
    ServiceState,
    Supervisor,
    UnknownService,
)
from machined.services.fake import FakeClock, FakeSpawner, exits, fails_to_spawn, hangs

S = ServiceState
T = 5.0  # generous bound on every wait; nothing here should take more than a few ms


@pytest.fixture
def spawner() -> FakeSpawner:
    return FakeSpawner()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sup(spawner: FakeSpawner, clock: FakeClock) -> AsyncIterator[Supervisor]:
    s = Supervisor(spawner=spawner, clock=clock)
    async with s:
        yield s


async def until(sup: Supervisor, name: str, *states: ServiceState):
    async with asyncio.timeout(T):
        return await sup.wait_state(name, *states)


async def sleeper(clock: FakeClock, *args: float) -> None:
    """Until something sleeps on ``clock`` (for that long, when given)."""
    async with asyncio.timeout(T):
        await clock.wait_for_sleeper(*args)


async def spawns(spawner: FakeSpawner, n: int, argv0: str):
    async with asyncio.timeout(T):
        return await spawner.wait_for_spawns(n, argv0)


def trail(sup: Supervisor, name: str, kind: EventKind | None = EventKind.STATE) -> list[tuple[S, str]]:
    return [(e.state, e.message) for e in sup.status(name).events if kind is None or e.kind is kind]


def svc(name: str, **kw) -> Service:
    kw.setdefault("backoff", Backoff(initial=1, factor=2, max=4, reset_after=60))
    return Service(name, (name,), **kw)


# -- lifecycle -------------------------------------------------------------------------------------


async def test_a_service_that_exits_zero_goes_through_talos_states(sup, spawner):
    spawner.program("job", exits(0, "hello", "bye"))
    sup.add(svc("job", restart=RestartPolicy.NEVER))
    assert sup.status("job").state is S.INITIALIZED
    await sup.start("job")
    await until(sup, "job", S.FINISHED)
    [proc] = spawner.of("job")
    assert trail(sup, "job") == [
        (S.STARTING, "Starting service"),
        (S.PREPARING, "Running pre state"),
        (S.RUNNING, f"Process job started with PID {proc.pid}"),
        (S.FINISHED, "Service finished successfully"),
    ]
    st = sup.status("job")
    assert st.last_exit == 0 and st.pid is None and not st.up
    assert [ln.text for ln in sup.logs("job").tail()] == ["hello", "bye"]


async def test_non_zero_exit_and_signals_are_failures(sup, spawner):
    spawner.program("bad", exits(3))
    spawner.program("segv", exits(-signal.SIGSEGV))
    sup.add(svc("bad", restart=RestartPolicy.NEVER), svc("segv", restart=RestartPolicy.NEVER))
    await sup.start("bad")
    await sup.start("segv")
    assert (await until(sup, "bad", S.FAILED)).message == "Process exited with code 3"
    assert (await until(sup, "segv", S.FAILED)).message == "Process killed by SIGSEGV"
    assert sup.status("bad").last_exit == 3


async def test_a_disabled_service_is_skipped_and_counts_as_up(sup, spawner):
    sup.add(svc("off", enabled=False), svc("user", depends_on=("off",)))
    await sup.start_all()
    await until(sup, "user", S.RUNNING)
    assert sup.status("off").state is S.SKIPPED and sup.status("off").up
    assert spawner.of("off") == []


async def test_spawn_failure_is_a_failure_and_is_retried_with_backoff(sup, spawner, clock):
    spawner.program("srv", fails_to_spawn("executable 'srv' not found"), hangs())
    sup.add(svc("srv", restart=RestartPolicy.ON_FAILURE))
    await sup.start("srv")
    await until(sup, "srv", S.WAITING)
    failed = [m for s, m in trail(sup, "srv") if s is S.FAILED]
    assert failed == ["Failed to start: executable 'srv' not found"]
    await sleeper(clock, 1.0)
    clock.advance(1.0)
    await until(sup, "srv", S.RUNNING)
    assert sup.status("srv").restarts == 1


# -- restart policies and back-off -------------------------------------------------------------------


async def test_always_restarts_with_exponential_backoff_up_to_the_cap(sup, spawner, clock):
    spawner.program("crash", exits(1, "boom"))
    sup.add(svc("crash"))
    await sup.start("crash")
    delays = []
    for n in range(1, 6):
        await sleeper(clock)
        assert sup.status("crash").state is S.WAITING
        delays.append(clock.sleepers()[0])
        assert sup.status("crash").message == f"Restarting in {delays[-1]:g}s (restart {n})"
        clock.advance(delays[-1])
        await spawns(spawner, n + 1, "crash")
    assert delays == [1, 2, 4, 4, 4]
    assert len(sup.logs("crash").tail()) >= 5  # the log ring spans restarts


async def test_always_restarts_after_a_clean_exit_too(sup, spawner, clock):
    spawner.program("oneshot", exits(0))
    sup.add(svc("oneshot"))
    await sup.start("oneshot")
    await sleeper(clock, 1.0)
    clock.advance(1.0)
    await spawns(spawner, 2, "oneshot")


async def test_on_failure_stops_restarting_after_success(sup, spawner, clock):
    spawner.program("migrate", exits(1), exits(0))
    sup.add(svc("migrate", restart=RestartPolicy.ON_FAILURE))
    await sup.start("migrate")
    await sleeper(clock, 1.0)
    clock.advance(1.0)
    st = await until(sup, "migrate", S.FINISHED)
    assert st.restarts == 1 and not sup.status("migrate").state.active
    assert len(spawner.of("migrate")) == 2


async def test_never_does_not_restart(sup, spawner, clock):
    spawner.program("once", exits(1))
    sup.add(svc("once", restart=RestartPolicy.NEVER))
    await sup.start("once")
    await until(sup, "once", S.FAILED)
    await asyncio.sleep(0.01)
    assert clock.sleepers() == [] and len(spawner.of("once")) == 1


async def test_a_long_run_resets_the_backoff(sup, spawner, clock):
    spawner.program("flaky", exits(1))
    sup.add(svc("flaky"))
    await sup.start("flaky")
    for d in (1, 2):
        await sleeper(clock, d)
        clock.advance(d)
        await spawns(spawner, d + 1, "flaky")
    await sleeper(clock, 4)
    spawner.program("flaky", hangs())
    clock.advance(4)
    [*_, long_run] = await spawns(spawner, 4, "flaky")
    await until(sup, "flaky", S.RUNNING)
    clock.advance(61)  # ran longer than reset_after
    long_run.exit(1)
    await sleeper(clock, 1.0)
    assert sup.status("flaky").message == "Restarting in 1s (restart 4)"


# -- stopping ---------------------------------------------------------------------------------------


async def test_stop_sends_sigterm_to_the_group_and_finishes(sup, spawner):
    sup.add(svc("web"))
    await sup.start("web")
    await until(sup, "web", S.RUNNING)
    [proc] = spawner.of("web")
    async with asyncio.timeout(T):
        await sup.stop("web")
    assert proc.signals[0] == signal.SIGTERM and not proc.alive
    assert trail(sup, "web")[-2:] == [
        (S.STOPPING, f"Stop requested: sending SIGTERM to process group {proc.pid}"),
        (S.FINISHED, "Service stopped"),
    ]
    assert sup.status("web").last_exit == -signal.SIGTERM


async def test_stop_escalates_to_sigkill_after_the_timeout(sup, spawner, clock):
    spawner.program("stubborn", hangs(ignore_sigterm=True))
    sup.add(svc("stubborn", stop_timeout=7))
    await sup.start("stubborn")
    await until(sup, "stubborn", S.RUNNING)
    [proc] = spawner.of("stubborn")
    stopping = asyncio.create_task(sup.stop("stubborn"))
    await sleeper(clock, 7)
    assert proc.signals == [signal.SIGTERM] and proc.alive
    clock.advance(6.9)
    await asyncio.sleep(0.01)
    assert proc.alive
    clock.advance(0.1)
    async with asyncio.timeout(T):
        await stopping
    assert proc.signals[:2] == [signal.SIGTERM, signal.SIGKILL] and not proc.alive
    msgs = [m for _, m in trail(sup, "stubborn")]
    assert "Process did not exit within 7s: sending SIGKILL" in msgs
    assert sup.status("stubborn").state is S.FINISHED


async def test_stop_while_waiting_never_spawns(sup, spawner):
    sup.add(svc("a", enabled=True), svc("b", depends_on=("a",)))
    await sup.start("b")  # a is never started: b waits
    st = await until(sup, "b", S.WAITING)
    assert st.message == 'Waiting for service "a" to be "up"'
    async with asyncio.timeout(T):
        await sup.stop("b")
    assert sup.status("b").state is S.FINISHED and spawner.of("b") == []


async def test_stop_during_backoff(sup, spawner, clock):
    spawner.program("crash", exits(1))
    sup.add(svc("crash"))
    await sup.start("crash")
    async with asyncio.timeout(T):
        await clock.wait_for_sleeper(1.0)
        await sup.stop("crash")
    assert trail(sup, "crash")[-1] == (S.FINISHED, "Service stopped")
    assert clock.sleepers() == []


async def test_restart_replaces_the_process_and_start_is_idempotent(sup, spawner):
    sup.add(svc("web"))
    await sup.start("web")
    await sup.start("web")
    await until(sup, "web", S.RUNNING)
    async with asyncio.timeout(T):
        await sup.restart("web")
    await until(sup, "web", S.RUNNING)
    first, second = spawner.of("web")
    assert not first.alive and second.alive
    assert sup.status("web").pid == second.pid


async def test_close_stops_everything(spawner, clock):
    s = Supervisor([svc("a"), svc("b", depends_on=("a",))], spawner=spawner, clock=clock)
    async with s:
        await s.start_all()
        await until(s, "b", S.RUNNING)
    assert all(not p.alive for p in spawner.spawned)
    assert {st.state for st in s.list()} == {S.FINISHED}
    with pytest.raises(RuntimeError):
        await s.start("a")


# -- definitions ------------------------------------------------------------------------------------


async def test_add_validates_the_dependency_graph(sup):
    with pytest.raises(ServiceConfigError, match="unknown service 'nope'"):
        sup.add(svc("a", depends_on=("nope",)))
    with pytest.raises(ServiceConfigError, match="dependency cycle"):
        sup.add(svc("a", depends_on=("b",)), svc("b", depends_on=("c",)), svc("c", depends_on=("a",)))
    assert sup.names() == []  # all-or-nothing
    sup.add(svc("a"))
    with pytest.raises(ServiceConfigError, match="already exists"):
        sup.add(svc("a"))
    sup.add(svc("b", depends_on=("a",)))  # deps may refer to earlier additions
    with pytest.raises(RuntimeError, match="dependency of b"):
        sup.remove("a")
    sup.remove("b")
    sup.remove("a")
    with pytest.raises(UnknownService):
        sup.status("a")


# -- dependencies -----------------------------------------------------------------------------------


async def test_dependents_wait_until_the_dependency_is_running_and_healthy(sup, spawner, clock):
    spawner.program("probe-db", exits(1, "not yet"), exits(0))
    db = svc("db", health=HealthCheck.exec("probe-db", initial_delay=0, interval=2, timeout=1))
    sup.add(svc("app", depends_on=("db",)), db)
    await sup.start_all()
    await until(sup, "db", S.RUNNING)
    await until(sup, "app", S.WAITING)
    assert sup.status("app").message == 'Waiting for service "db" to be "up"'
    async with asyncio.timeout(T):
        await sup.wait_for(lambda s: not s.status("db").health.unknown)
    assert not sup.status("db").health.healthy and sup.status("app").state is S.WAITING
    await sleeper(clock, 2)
    clock.advance(2)
    await until(sup, "app", S.RUNNING)
    assert sup.status("db").health.healthy and sup.status("db").up
    order = [p.cmd.argv[0] for p in spawner.spawned if p.cmd.argv[0] in ("db", "app")]
    assert order == ["db", "app"]
    health = trail(sup, "db", EventKind.HEALTH)
    assert health == [
        (S.RUNNING, "Health check failed: exec probe-db: exit code 1: not yet"),
        (S.RUNNING, "Health check successful"),
    ]


async def test_health_events_only_on_change(sup, spawner, clock):
    spawner.program("probe", exits(0))
    sup.add(svc("web", health=HealthCheck.exec("probe", initial_delay=0, interval=1)))
    await sup.start("web")
    for n in range(1, 4):
        await spawns(spawner, n, "probe")
        await sleeper(clock, 1)
        clock.advance(1)
    assert len(trail(sup, "web", EventKind.HEALTH)) == 1
    assert sup.status("web").health.last_change == clock.time() - 3


async def test_stop_stops_reverse_dependencies_first(sup, spawner):
    sup.add(svc("base"), svc("mid", depends_on=("base",)), svc("top", depends_on=("mid",)), svc("other"))
    await sup.start_all()
    await until(sup, "top", S.RUNNING)
    seen: list[tuple[str, S]] = []
    sup.add_listener(lambda e: seen.append((e.service, e.state)) if e.state is S.FINISHED else None)
    async with asyncio.timeout(T):
        await sup.stop("base")
    assert seen == [("top", S.FINISHED), ("mid", S.FINISHED), ("base", S.FINISHED)]
    assert sup.status("other").state is S.RUNNING


async def test_dependents_are_told_when_a_dependency_goes_down_and_up(sup, spawner, clock):
    spawner.program("db", exits(1), hangs())
    sup.add(svc("db"), svc("app", depends_on=("db",)))
    await sup.start("db")
    await sleeper(clock, 1)
    clock.advance(1)
    [_, db2] = await spawns(spawner, 2, "db")
    await sup.start("app")
    await until(sup, "app", S.RUNNING)
    db2.exit(2)
    await sleeper(clock, 2)
    clock.advance(2)
    await until(sup, "db", S.RUNNING)
    notes = [m for _, m in trail(sup, "app", None) if "Dependency" in m]
    assert notes == ['Dependency "db" is down (Failed)', 'Dependency "db" is up again']
    assert sup.status("app").state is S.RUNNING and len(spawner.of("app")) == 1


# -- the mesh ---------------------------------------------------------------------------------------

UP3 = MeshHealth(True, peers=3, up=3)
DEGRADED = MeshHealth(True, peers=3, up=2, down=("n3",))


async def test_mesh_gating_waits_then_starts_when_ready(sup, spawner):
    sup.add(svc("etcd", requires_mesh="ready"))
    await sup.start("etcd")
    st = await until(sup, "etcd", S.WAITING)
    assert st.message == "Waiting for the mesh (no mesh status yet (requires ready))"
    sup.set_mesh(MeshHealth(False))
    await asyncio.sleep(0.01)
    assert sup.status("etcd").message == "Waiting for the mesh (mesh not ready (requires ready))"
    sup.set_mesh(DEGRADED)
    await asyncio.sleep(0.01)
    assert sup.status("etcd").message == "Waiting for the mesh (2/3 peers up (down: n3), requires all)"
    assert spawner.of("etcd") == []
    sup.set_mesh(UP3)
    await until(sup, "etcd", S.RUNNING)


async def test_quorum_and_dependencies_combine_in_the_waiting_message(sup, spawner):
    sup.add(svc("db"), svc("app", depends_on=("db",), requires_mesh="quorum 2"))
    sup.set_mesh(MeshHealth(True, peers=4, up=1))
    await sup.start("app")
    st = await until(sup, "app", S.WAITING)
    assert st.message == (
        'Waiting for service "db" to be "up" and the mesh (1/4 peers up, requires at least 2)'
    )
    await sup.start("db")
    await until(sup, "db", S.RUNNING)
    await asyncio.sleep(0.01)
    assert sup.status("app").message == "Waiting for the mesh (1/4 peers up, requires at least 2)"
    sup.set_mesh(MeshHealth(True, peers=4, up=2))
    await until(sup, "app", S.RUNNING)


async def test_mesh_degraded_ignore_notifies_and_keeps_running(spawner, clock):
    calls = []
    s = Supervisor(
        [svc("etcd", requires_mesh="ready")],
        spawner=spawner,
        clock=clock,
        mesh_hook=lambda name, degraded, mesh: calls.append((name, degraded, mesh)),
    )
    async with s:
        s.set_mesh(UP3)
        await s.start("etcd")
        await until(s, "etcd", S.RUNNING)
        s.set_mesh(DEGRADED)
        s.set_mesh(MeshHealth(True, peers=3, up=1, down=("n2", "n3")))  # still degraded: no new notice
        s.set_mesh(UP3)
        notes = [(e.kind, e.message) for e in s.status("etcd").events if e.kind is not EventKind.STATE]
        assert notes == [
            (EventKind.MESH_DEGRADED, "Mesh degraded: 2/3 peers up (down: n3), requires all; still running"),
            (EventKind.MESH_RECOVERED, "Mesh recovered: 3/3 peers up, requires all"),
        ]
        assert calls == [("etcd", True, DEGRADED), ("etcd", False, UP3)]
        assert s.status("etcd").state is S.RUNNING and len(spawner.of("etcd")) == 1


async def test_mesh_degraded_stop_stops_and_restarts_on_recovery(sup, spawner, clock):
    sup.add(svc("etcd", requires_mesh="ready", on_mesh_degraded="stop"))
    sup.set_mesh(UP3)
    await sup.start("etcd")
    await until(sup, "etcd", S.RUNNING)
    [first] = spawner.of("etcd")
    sup.set_mesh(DEGRADED)
    st = await until(sup, "etcd", S.WAITING)
    assert st.message.startswith("Waiting for the mesh (2/3 peers up")
    assert first.signals[0] == signal.SIGTERM and first.returncode == -signal.SIGTERM
    assert any(
        s is S.STOPPING and m.startswith("Mesh degraded: sending SIGTERM") for s, m in trail(sup, "etcd")
    )
    assert clock.sleepers() == []  # no back-off: a mesh stop is not a failure
    sup.set_mesh(UP3)
    await until(sup, "etcd", S.RUNNING)
    assert len(spawner.of("etcd")) == 2 and sup.status("etcd").restarts == 0


async def test_mesh_degraded_restart_keeps_running_then_restarts_on_recovery(sup, spawner):
    sup.add(svc("etcd", requires_mesh="quorum 2", on_mesh_degraded="restart"))
    sup.set_mesh(UP3)
    await sup.start("etcd")
    await until(sup, "etcd", S.RUNNING)
    [first] = spawner.of("etcd")
    sup.set_mesh(MeshHealth(True, peers=3, up=1))
    await asyncio.sleep(0.01)
    assert first.alive and sup.status("etcd").state is S.RUNNING
    assert sup.status("etcd").events[-1].message.endswith("will restart when it recovers")
    sup.set_mesh(UP3)
    [_, second] = await spawns(spawner, 2, "etcd")
    await until(sup, "etcd", S.RUNNING)
    assert not first.alive and second.alive
    assert any(m.startswith("Mesh recovered, restarting: sending SIGTERM") for _, m in trail(sup, "etcd"))


async def test_mesh_feed_from_an_async_iterable(spawner, clock):
    feed: asyncio.Queue[MeshHealth | None] = asyncio.Queue()

    async def source():
        while True:
            yield await feed.get()

    s = Supervisor([svc("etcd", requires_mesh="ready")], spawner=spawner, clock=clock, mesh=source())
    async with s:
        await s.start("etcd")
        await until(s, "etcd", S.WAITING)
        feed.put_nowait(UP3)
        await until(s, "etcd", S.RUNNING)
        assert s.mesh == UP3


# -- observation ------------------------------------------------------------------------------------


async def test_subscribers_get_a_tail_then_live_events(sup, spawner):
    sup.add(svc("a", restart=RestartPolicy.NEVER))
    spawner.program("a", exits(0))
    await sup.start("a")
    await until(sup, "a", S.FINISHED)
    sub = sup.subscribe(tail=2)
    spawner.program("a", hangs())
    await sup.start("a")
    await until(sup, "a", S.RUNNING)
    got = []
    async with asyncio.timeout(T):
        async for ev in sub:
            got.append((ev.state, ev.message.split(" with PID")[0]))
            if len(got) == 5:
                break
    assert got == [
        (S.RUNNING, "Process a started"),
        (S.FINISHED, "Service finished successfully"),
        (S.STARTING, "Starting service"),
        (S.PREPARING, "Running pre state"),
        (S.RUNNING, "Process a started"),
    ]
    seqs = [e.seq for e in sup.status("a").events]
    assert seqs == sorted(seqs) and sup.status("a").events[0].timestamp == clock_time(sup)


def clock_time(sup: Supervisor) -> float:
    return sup.clock.time()


async def test_event_ring_is_bounded(spawner, clock):
    s = Supervisor(
        [svc("crash", restart=RestartPolicy.ALWAYS)], spawner=spawner, clock=clock, event_ring_size=8
    )
    spawner.program("crash", exits(1))
    async with s:
        await s.start("crash")
        for n in range(1, 5):
            await sleeper(clock)
            clock.advance(clock.sleepers()[0])
            await spawns(spawner, n + 1, "crash")
        assert len(s.status("crash").events) == 8


async def test_follow_service_logs_across_a_restart(sup, spawner):
    spawner.program("web", hangs("starting"))
    sup.add(svc("web"))
    await sup.start("web")
    await until(sup, "web", S.RUNNING)
    got: list[str] = []

    async def follow():
        async for line in sup.logs("web").follow(tail=None):
            got.append(f"{line.stream}:{line.text}")
            if len(got) == 4:
                return

    task = asyncio.create_task(follow())
    [proc] = spawner.of("web")
    proc.print("oops", stderr=True)
    await sup.restart("web")
    [_, proc2] = await spawns(spawner, 2, "web")
    proc2.print("ready")
    async with asyncio.timeout(T):
        await task
    assert got == ["stdout:starting", "stderr:oops", "stdout:starting", "stdout:ready"]

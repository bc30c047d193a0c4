"""The service supervisor with real processes on loopback (no root needed)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

import pytest

from machined.services import (
    Backoff,
    EventKind,
    HealthCheck,
    RestartPolicy,
    Service,
    ServiceState,
    Supervisor,
)

S = ServiceState
pytestmark = pytest.mark.timeout(30)
T = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_gone(pgid: int) -> bool:
    """No live member of the process group is left (zombies waiting for init to reap them are dead)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return False
    return True


async def group_dies(pgid: int) -> bool:
    """Signals are delivered asynchronously: give the members a moment to die."""
    for _ in range(100):
        if group_gone(pgid):
            return True
        await asyncio.sleep(0.02)
    return False


async def until(sup: Supervisor, name: str, *states: ServiceState):
    async with asyncio.timeout(T):
        return await sup.wait_state(name, *states)


FAST = Backoff(initial=0.05, factor=2, max=0.2, reset_after=60)


async def test_a_shell_service_prints_and_exits_and_is_restarted_until_it_succeeds(tmp_path: Path):
    counter = tmp_path / "runs"
    script = (
        f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; "
        'echo "run $n"; echo "err $n" >&2; [ "$n" -ge 3 ] && exit 0; exit 1'
    )
    svc = Service(
        "counter",
        ("sh", "-c", script),
        restart=RestartPolicy.ON_FAILURE,
        backoff=FAST,
        log_file=str(tmp_path / "counter.log"),
    )
    async with Supervisor([svc]) as sup:
        await sup.start("counter")
        st = await until(sup, "counter", S.FINISHED)
    assert st.restarts == 2 and st.last_exit == 0
    states = [e.state for e in st.events]
    assert states.count(S.FAILED) == 2 and states[-1] is S.FINISHED
    failed = [e.message for e in st.events if e.state is S.FAILED]
    assert failed == ["Process exited with code 1"] * 2
    lines = sup.logs("counter").tail()
    assert [ln.text for ln in lines if ln.stream == "stdout"] == ["run 1", "run 2", "run 3"]
    assert [ln.text for ln in lines if ln.stream == "stderr"] == ["err 1", "err 2", "err 3"]
    assert sorted((tmp_path / "counter.log").read_text().split("\n")[:-1]) == sorted(ln.text for ln in lines)


async def test_always_restarts_a_clean_exit(tmp_path: Path):
    svc = Service("tick", ("sh", "-c", "echo tick"), backoff=FAST)
    async with Supervisor([svc]) as sup:
        await sup.start("tick")
        async with asyncio.timeout(T):
            await sup.wait_for(lambda s: len(s.logs("tick")) >= 3)  # re-checked at each state change
        assert sup.status("tick").restarts >= 2
    assert [ln.text for ln in sup.logs("tick").tail()][:3] == ["tick"] * 3


async def test_a_missing_executable_fails_with_a_clear_message():
    svc = Service("ghost", ("no-such-binary-xyz",), restart=RestartPolicy.NEVER)
    async with Supervisor([svc]) as sup:
        await sup.start("ghost")
        st = await until(sup, "ghost", S.FAILED)
    assert st.message.startswith("Failed to start: executable 'no-such-binary-xyz' not found in PATH")


async def test_tcp_health_check_against_a_real_server_gates_a_dependent():
    port = free_port()
    server = (
        "import socket, time, sys\n"
        "time.sleep(0.4)\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {port})); s.listen(16)\n"
        "print('listening', flush=True)\n"
        "while True:\n"
        "    c, _ = s.accept(); c.close()\n"
    )
    db = Service(
        "db",
        (sys.executable, "-c", server),
        health=HealthCheck.tcp("127.0.0.1", port, initial_delay=0.05, interval=0.1, timeout=0.5),
        stop_timeout=2,
    )
    app = Service("app", ("sleep", "60"), depends_on=("db",))
    async with Supervisor([db, app]) as sup:
        await sup.start_all()
        st = await until(sup, "app", S.RUNNING)
        db_st = sup.status("db")
        assert db_st.health.healthy and db_st.up
        health = [e.message for e in db_st.events if e.kind is EventKind.HEALTH]
        assert health[-1] == "Health check successful"
        assert health[0].startswith(f"Health check failed: tcp 127.0.0.1:{port}")  # before it listened
        app_waits = [e.message for e in sup.status("app").events if e.state is S.WAITING]
        assert app_waits == ['Waiting for service "db" to be "up"']
        assert st.pid is not None
        assert [ln.text for ln in sup.logs("db").tail()] == ["listening"]


async def test_http_and_exec_health_checks_against_real_processes(tmp_path: Path):
    port = free_port()
    web = Service(
        "web",
        (sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)),
        cwd=str(tmp_path),
        health=HealthCheck.http(f"http://127.0.0.1:{port}/", initial_delay=0.1, interval=0.1, timeout=1),
    )
    flag = tmp_path / "ok"
    worker = Service(
        "worker",
        ("sleep", "60"),
        health=HealthCheck.exec(
            "sh",
            "-c",
            f"test -e {flag} || {{ echo missing; exit 1; }}",
            initial_delay=0,
            interval=0.1,
            timeout=2,
        ),
    )
    async with Supervisor([web, worker]) as sup:
        await sup.start_all()
        async with asyncio.timeout(T):
            await sup.wait_for(lambda s: s.status("web").health.healthy)
            await sup.wait_for(lambda s: not s.status("worker").health.unknown)
        h = sup.status("worker").health
        assert not h.healthy and h.last_message.endswith("exit code 1: missing")
        flag.touch()
        async with asyncio.timeout(T):
            await sup.wait_for(lambda s: s.status("worker").health.healthy)


async def test_a_sigterm_ignoring_process_group_is_killed_after_the_timeout():
    # the shell ignores SIGTERM, and so does its child (an ignored disposition survives exec)
    script = "trap '' TERM; sleep 60 & echo ready; while :; do sleep 0.05; done"
    svc = Service("stubborn", ("sh", "-c", script), stop_timeout=0.5)
    async with Supervisor([svc]) as sup:
        await sup.start("stubborn")
        st = await until(sup, "stubborn", S.RUNNING)
        pid = st.pid
        assert pid is not None
        async with asyncio.timeout(T):
            async for line in sup.logs("stubborn").follow(tail=None):
                if line.text == "ready":
                    break
        t0 = time.monotonic()
        async with asyncio.timeout(T):
            await sup.stop("stubborn")
        elapsed = time.monotonic() - t0
        st = sup.status("stubborn")
    assert 0.5 <= elapsed < 5
    assert st.state is S.FINISHED and st.last_exit == -9
    msgs = [e.message for e in st.events]
    assert "Process did not exit within 0.5s: sending SIGKILL" in msgs
    assert await group_dies(pid)  # the shell and its background `sleep 60`


async def test_sigterm_stops_the_whole_group_and_stragglers_are_reaped_after_exit():
    svc = Service("forks", ("sh", "-c", "sleep 60 & sleep 60 & echo up; wait"), stop_timeout=5)
    oneshot = Service("leaves-child", ("sh", "-c", "sleep 60 & echo bye"), restart=RestartPolicy.NEVER)
    async with Supervisor([svc, oneshot]) as sup:
        await sup.start_all()
        st = await until(sup, "forks", S.RUNNING)
        done = await until(sup, "leaves-child", S.FINISHED)
        child_pgid = next(e for e in done.events if e.state is S.RUNNING).message.rsplit(" ", 1)[1]
        assert await group_dies(int(child_pgid))  # its background sleep was killed with the group
        async with asyncio.timeout(T):
            await sup.stop("forks")
        assert sup.status("forks").state is S.FINISHED
        assert await group_dies(st.pid)


async def test_follow_logs_of_a_real_process():
    script = "for i in 1 2 3 4 5; do echo line $i; sleep 0.05; done; sleep 60"
    svc = Service("talker", ("sh", "-c", script), stop_timeout=1)
    async with Supervisor([svc]) as sup:
        await sup.start("talker")
        got: list[str] = []
        async with asyncio.timeout(T):
            async for line in sup.logs("talker").follow(tail=0):
                got.append(line.text)
                if line.text == "line 5":
                    break
        assert got[-1] == "line 5" and got == [f"line {i}" for i in range(6 - len(got), 6)]
        assert [ln.text for ln in sup.logs("talker").tail(2)] == ["line 4", "line 5"]


@pytest.mark.root
async def test_a_service_runs_as_its_user():
    import pwd

    nobody = pwd.getpwnam("nobody")
    svc = Service("whoami", ("sh", "-c", "id -u; id -g"), user="nobody", restart=RestartPolicy.NEVER, cwd="/")
    async with Supervisor([svc]) as sup:
        await sup.start("whoami")
        await until(sup, "whoami", S.FINISHED)
    assert [ln.text for ln in sup.logs("whoami").tail()] == [str(nobody.pw_uid), str(nobody.pw_gid)]

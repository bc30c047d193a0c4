"""The real spawner's preparation checks (no process started) and the fakes' own semantics."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from machined.services import Command, SpawnError
from machined.services.fake import FakeClock, FakeProcess
from machined.services.process import build_env, describe_exit, prepare


def test_prepare_resolves_the_executable_in_path():
    exe, env, kw = prepare(Command(("sh", "-c", "true"), {"X": "1"}))
    assert os.path.basename(exe) == "sh" and os.access(exe, os.X_OK)
    assert env["X"] == "1" and "PATH" in env
    assert kw == {}


@pytest.mark.parametrize(
    ("cmd", "needle"),
    [
        (Command(("no-such-binary-xyz",)), "executable 'no-such-binary-xyz' not found in PATH"),
        (Command(("sh",), cwd="/no/such/dir"), "working directory /no/such/dir does not exist"),
        (Command(("sh",), user="no-such-user-xyz"), "user 'no-such-user-xyz' does not exist"),
    ],
)
def test_prepare_names_the_problem(cmd, needle):
    with pytest.raises(SpawnError) as ei:
        prepare(cmd)
    assert needle in str(ei.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may switch users")
def test_another_user_needs_root():
    with pytest.raises(SpawnError, match="not running as root"):
        prepare(Command(("sh",), user=0))


def test_prepare_refuses_a_non_executable_path(tmp_path):
    f = tmp_path / "script"
    f.write_text("#!/bin/sh\n")
    with pytest.raises(SpawnError, match="is not an executable file"):
        prepare(Command((str(f),)))


def test_running_as_ourselves_needs_no_switch():
    assert prepare(Command(("sh",), user=os.geteuid()))[2] == {}


def test_env_is_path_plus_the_service_env_only(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "x")
    env = build_env({"A": "b", "PATH": "/opt/bin"})
    assert env == {"A": "b", "PATH": "/opt/bin"}


def test_describe_exit():
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-200) == "killed by signal 200"


async def test_fake_clock_wakes_sleepers_in_deadline_order():
    clock = FakeClock(start=0)
    woke: list[str] = []

    async def sleeper(name: str, d: float) -> None:
        await clock.sleep(d)
        woke.append(f"{name}@{clock.monotonic():g}")

    tasks = [asyncio.create_task(sleeper("b", 2)), asyncio.create_task(sleeper("a", 1))]
    async with asyncio.timeout(2):
        await clock.wait_for_sleeper(2)
        await clock.wait_for_sleeper(1)
    assert clock.sleepers() == [1, 2]
    clock.advance(1.5)
    await asyncio.sleep(0)
    assert woke == ["a@1.5"]
    clock.advance(1)
    await asyncio.gather(*tasks)
    assert woke == ["a@1.5", "b@2.5"] and clock.sleepers() == []


async def test_fake_process_signals():
    p = FakeProcess(ignore_sigterm=True)
    p.signal_group(signal.SIGHUP)
    p.signal_group(signal.SIGTERM)
    assert p.alive
    p.signal_group(signal.SIGKILL)
    assert await p.wait() == -signal.SIGKILL
    q = FakeProcess(term_code=0)
    q.signal_group(signal.SIGTERM)
    assert await q.wait() == 0

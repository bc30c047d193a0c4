"""netns.launcher's fork server without root: it starts with the agent's modules imported, answers
bad requests with an error naming the field, reaps what it forked, and ends at EOF."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from netns.launcher import Launcher, LaunchError
from netns.mesh import AGENT_PRELOAD as PRELOAD


@pytest.fixture
def launcher(tmp_path: Path):
    la = Launcher(tmp_path / "launcher.log", PRELOAD)
    yield la
    la.close()


def test_ready_after_the_agents_imports(launcher: Launcher) -> None:
    ready = launcher.ready
    assert ready["ready"] is True
    assert ready["modules"] > len(PRELOAD)  # the preloads and what they import
    assert 0 < ready["import_cpu"] <= ready["start_cpu"]


@pytest.mark.parametrize(
    ("req", "says"),
    [
        ({"op": "exec"}, "unknown op 'exec'"),
        ({"op": "spawn", "args": [], "ns": "x", "log": "/dev/null", "env": {}}, "'module' must be a str"),
        (
            {"op": "spawn", "module": "m", "args": "run", "ns": "x", "log": "/dev/null", "env": {}},
            "'args' must be a list",
        ),
        ({"op": "spawn", "module": "m", "args": [], "ns": "x", "log": "/dev/null"}, "'env' must be a dict"),
        ({"op": "wait", "pid": "1"}, "'pid' must be an int"),
        ([1, 2], "a request must be a JSON object"),
        (
            {"op": "spawn", "module": "m", "args": [], "ns": "x", "log": "/dev/null", "env": {}, "wg_dir": 3},
            "'wg_dir' must be a str or null",
        ),
    ],
)
def test_bad_requests_name_the_field(launcher: Launcher, req: object, says: str) -> None:
    with pytest.raises(LaunchError, match=says):
        launcher.request(req)


def test_waiting_for_a_process_it_did_not_fork_is_an_error(launcher: Launcher) -> None:
    with pytest.raises(LaunchError, match="No child processes"):
        launcher.request({"op": "wait", "pid": 1, "timeout": 0})
    # and the server still answers afterwards
    with pytest.raises(LaunchError, match="unknown op"):
        launcher.request({"op": "?"})


def test_a_child_that_cannot_enter_its_node_exits_1_with_the_reason_in_its_log(
    launcher: Launcher, tmp_path: Path
) -> None:
    log = tmp_path / "agent.log"
    proc = launcher.spawn("kubespan.cli", ["--version"], ns="no-such-netns", log=log, env={}, wg_dir=None)
    assert proc.wait(30) == 1
    assert proc.poll() == 1
    text = log.read_text()
    # unshare (without root) or opening the namespace (with root) failed before the agent's code ran
    assert "Traceback" in text and ("unshare(CLONE_NEWNS)" in text or "/run/netns/no-such-netns" in text), (
        text
    )


def test_eof_ends_the_server(tmp_path: Path) -> None:
    la = Launcher(tmp_path / "launcher.log", PRELOAD)
    proc = la._proc
    la.close()
    assert proc.returncode == 0
    with pytest.raises(LaunchError, match="exited"):
        la.request({"op": "wait", "pid": 1})


def test_a_batch_sends_spawns_at_once_and_sets_pids_at_its_end(launcher: Launcher, tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    with launcher.batch():
        procs = [
            launcher.spawn("kubespan.cli", ["--version"], ns="no-such-netns", log=log, env={}, wg_dir=None)
            for _ in range(3)
        ]
        with pytest.raises(LaunchError, match="not forked yet"):
            procs[0].pid  # noqa: B018 (never 0: os.kill(0, sig) would signal the lab's group)
        with pytest.raises(LaunchError, match="inside a spawn batch"):
            launcher.request({"op": "wait", "pid": 1})
    assert len({p.pid for p in procs}) == 3
    assert [p.wait(30) for p in procs] == [1, 1, 1]  # none could enter its (missing) node


def test_a_failed_spawn_in_a_batch_is_named_and_the_server_stays_in_step(
    launcher: Launcher, tmp_path: Path
) -> None:
    log = tmp_path / "agent.log"
    with pytest.raises(
        LaunchError, match=r"1 of 2 spawns failed: spawn 2 \(7\): spawn: 'module' must be a str"
    ):
        with launcher.batch():
            first = launcher.spawn("kubespan.cli", ["--version"], ns="none", log=log, env={}, wg_dir=None)
            launcher.spawn(7, [], ns="none", log=log, env={}, wg_dir=None)  # type: ignore[arg-type]
    assert first.wait(30) in (1, -9)  # killed with the failed batch, or already failed to enter "none"
    with pytest.raises(LaunchError, match="unknown op"):  # the next answer is this request's
        launcher.request({"op": "?"})


def test_children_of_a_server_that_is_gone_are_polled_by_their_pid(tmp_path: Path) -> None:
    la = Launcher(tmp_path / "launcher.log", PRELOAD)
    proc = la.spawn(
        "kubespan.cli", ["--version"], ns="no-such-netns", log=tmp_path / "a.log", env={}, wg_dir=None
    )
    la.close()  # the child (failed at once) is re-parented to init and reaped there: its code is lost
    assert not la.alive
    assert proc.wait(10) == -signal.SIGKILL and proc.poll() == -signal.SIGKILL

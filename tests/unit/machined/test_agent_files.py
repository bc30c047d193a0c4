"""What the agent does with paths it did not create: a ``--socket`` path holding anything but a socket
is refused (never deleted), a stale socket is still replaced; secret files readable by group/others
and a state directory open to others are reported once, as WARNINGs, at start."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kubespan.perms import permission_problems, warn_permissions
from machined.api.server import NotASocket, check_socket_path, serve
from machined.config.testing import config_yaml, new_secret
from machined.daemon import Agent, AgentError, AgentOptions, StaticNetInfo
from machined.daemon.testing import FakeMeshWorld
from machined.services.fake import FakeSpawner

SECRET = new_secret()


def cfg() -> str:
    return config_yaml(
        cluster_id="files",
        secret=SECRET,
        discovery=(),
        kubespan=False,
        agent={"nodename": "n1", "httpStatusAddr": ""},
    )


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    agents: list[Agent] = []

    def make(**opts: Any) -> Agent:
        path = tmp_path / "config.yaml"
        if not path.exists():
            path.write_text(cfg())
            path.chmod(0o600)
        opts.setdefault("serve_api", False)
        a = Agent(
            AgentOptions(state_dir=tmp_path / "state", config_path=path, serve_http=False, **opts),
            mesh_factory=FakeMeshWorld(),
            spawner=FakeSpawner(),
            netinfo=StaticNetInfo(),
        )
        agents.append(a)
        return a

    yield make
    for a in agents:
        await a.stop()


# -- the socket path ---------------------------------------------------------------------------------------


def _things(tmp_path: Path) -> dict[str, Path]:
    f = tmp_path / "file"
    f.write_text("precious")
    d = tmp_path / "dir"
    d.mkdir()
    link = tmp_path / "link"
    link.symlink_to(f)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {
        "a regular file": f,
        "a directory": d,
        "a symbolic link": link,
        "a symbolic link ": dangling,
        "a FIFO": fifo,
    }


def test_check_socket_path_names_what_is_there(tmp_path):
    assert check_socket_path(tmp_path / "absent.sock") is False
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "m.sock"))
    s.close()
    assert check_socket_path(tmp_path / "m.sock") is True
    for what, path in _things(tmp_path).items():
        with pytest.raises(NotASocket) as e:
            check_socket_path(path)
        assert str(e.value).startswith(f"{path} is {what.strip()}, not a unix socket: refusing to replace it")


async def test_serve_refuses_and_keeps_what_is_not_a_socket(tmp_path):
    for path in _things(tmp_path).values():
        before = os.lstat(path)
        with pytest.raises(NotASocket):
            await serve(object(), path)  # type: ignore[arg-type]
        assert os.lstat(path) == before
    assert (tmp_path / "file").read_text() == "precious"


async def test_the_agent_refuses_a_socket_path_that_is_a_file_before_starting_anything(make, tmp_path):
    victim = tmp_path / "etc-passwd-lookalike"
    victim.write_text("root:x:0:0\n")
    a = make(serve_api=True, socket_path=victim)
    with pytest.raises(AgentError) as e:
        await a.start()
    assert str(e.value) == (
        f"machine API socket: {victim} is a regular file, not a unix socket: refusing to replace it "
        "(remove it or pass another --socket)"
    )
    assert victim.read_text() == "root:x:0:0\n"
    assert a.config.running is None and a.supervisor is None  # refused before the config and the mesh


async def test_the_agent_replaces_a_stale_socket(make, tmp_path):
    path = tmp_path / "m.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # what a killed agent leaves
    a = make(serve_api=True, socket_path=path)
    await a.start()
    assert check_socket_path(path)
    await a.stop()
    assert not path.exists()


# -- permissions -------------------------------------------------------------------------------------------


def test_permission_problems(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s")
    state = tmp_path / "state"
    state.mkdir()
    for smode, dmode, expected in (
        (0o600, 0o700, []),
        (0o400, 0o750, []),  # group may enter the state directory: fine
        (0o640, 0o700, ["readable by group"]),
        (0o604, 0o700, ["readable by others"]),
        (0o644, 0o755, ["readable by group and others", "is readable by others"]),
        (0o600, 0o703, ["is writable by others"]),
        (0o600, 0o777, ["is readable and writable by others"]),
    ):
        secret.chmod(smode)
        state.chmod(dmode)
        found = [m for m, _ in permission_problems((secret, None, tmp_path / "absent"), state)]
        assert len(found) == len(expected), (oct(smode), oct(dmode), found)
        for msg, part in zip(found, expected, strict=True):
            assert part in msg
    state.chmod(0o700)


async def test_the_agent_warns_once_at_start(make, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="machined")
    a = make()
    (tmp_path / "config.yaml").chmod(0o644)
    (tmp_path / "state").chmod(0o757)
    await a.start()
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "machined"]
    msgs = [r.getMessage() for r in warned]
    assert sum("cluster secret is readable by group and others" in m for m in msgs) == 1
    assert sum("state directory" in m and "readable and writable by others" in m for m in msgs) == 1
    # the persisted copy is written 0600 by the store: not reported
    assert (os.stat(tmp_path / "state" / "config.yaml").st_mode & 0o777) == 0o600
    caplog.clear()
    a.config.apply(cfg())
    assert not [r for r in caplog.records if "readable" in r.getMessage()]  # once, at start


async def test_a_private_setup_warns_nothing(make, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    await make().start()
    assert not [r for r in caplog.records if "readable" in r.getMessage() or "writable" in r.getMessage()]


def test_warn_permissions_returns_what_it_logged(tmp_path, caplog):
    f = tmp_path / "cluster.secret"
    f.write_text("x")
    f.chmod(0o644)
    caplog.set_level(logging.WARNING, logger="kubespan")
    msgs = warn_permissions(logging.getLogger("kubespan"), (f,), tmp_path)
    assert len(msgs) == 1 and [r.getMessage() for r in caplog.records] == msgs

"""Integration fixtures: real discovery-service processes on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from discovery.testing import ServerProcess


@pytest.fixture
def discovery_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``discovery_server(*flags, state_dir=...)`` starts a server; all are killed at teardown."""
    started: list[ServerProcess] = []

    def start(*flags: str, state_dir: Path | None = None, rate_limit: float = 0) -> ServerProcess:
        n = len(started)
        sd = state_dir if state_dir is not None else tmp_path / f"state-{n}"
        srv = ServerProcess(sd, *flags, rate_limit=rate_limit, log_path=tmp_path / f"server-{n}.log")
        started.append(srv.start())
        return srv

    yield start
    for s in started:
        s.kill()

"""Integration fixtures: real discovery-service processes on loopback, and registry replicas on a real etcd."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from discovery.limits import Limits
from discovery.server.etcdstore import EtcdBackend
from discovery.testing import ServerProcess
from spanutil.etcdlab import EtcdLab, etcd_binary


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


_prefixes = itertools.count()
NO_ETCD = "etcd is not installed (Debian: etcd-server, which `make sysdeps` installs; or set $ETCD_BIN)"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdLab]:
    """One etcd member for a test module; its tests skip where etcd is missing."""
    if etcd_binary() is None:
        pytest.skip(NO_ETCD)
    with EtcdLab(tmp_path_factory.mktemp("etcd"), 1) as lab:
        yield lab


@pytest.fixture
async def replicas(etcd: EtcdLab) -> AsyncIterator[object]:
    """Factory: ``await replicas(n, bucket=2.0, limits=None, call_timeout=5.0)`` → n started, ready
    EtcdBackends on one fresh prefix of ``etcd``; all stopped at teardown."""
    prefix = f"/etcd-test-{next(_prefixes)}/"
    made: list[EtcdBackend] = []

    async def factory(
        n: int, bucket: float = 2.0, limits: Limits | None = None, call_timeout: float = 5.0
    ) -> list[EtcdBackend]:
        out = [
            EtcdBackend(
                etcd.endpoints,
                prefix=prefix,
                bucket=bucket,
                limits=limits or Limits(),
                probe_interval=0.2,
                timeout=call_timeout,
            )
            for _ in range(n)
        ]
        for b in out:
            await b.start()
        for b in out:
            assert await b.wait_ready(10), b.health()
        made.extend(out)
        return out

    yield factory
    for b in made:
        await b.stop()

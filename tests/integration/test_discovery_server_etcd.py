"""The discovery-service process tests of test_discovery_server, run again with ``--store etcd`` on a real
etcd member (issue 15): every RPC behaves the same on both stores. The tests that are about the embedded
store's files (kill -9 with a journal, snapshots, restarts) or about TLS stay there only."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_discovery_server import (  # noqa: F401  (collected here again, with the fixture below)
    test_cluster_affiliate_limit,
    test_expiry_notifies_watchers,
    test_health_reflection_pages_and_metrics,
    test_proxy_headers_only_from_trusted_proxies,
    test_rate_limit,
    test_redirect,
    test_rpc_semantics,
    test_slow_watcher_is_aborted_with_lost_update,
    test_validation_codes_and_no_partial_mutation,
)

from discovery.testing import ServerProcess
from spanutil.etcdlab import EtcdLab

_prefixes = itertools.count()


@pytest.fixture
def discovery_server(tmp_path: Path, etcd: EtcdLab) -> Iterator[Callable[..., ServerProcess]]:
    """As conftest's, but every server is a replica on etcd (its own prefix per test)."""
    started: list[ServerProcess] = []
    prefix = f"/server-test-{next(_prefixes)}/"

    def start(*flags: str, state_dir: Path | None = None, rate_limit: float = 0) -> ServerProcess:
        n = len(started)
        etcd_flags = ["--store", "etcd", "--etcd-prefix", prefix, "--etcd-lease-bucket", "1s"]
        for url in etcd.endpoints:
            etcd_flags += ["--etcd-endpoint", url]
        srv = ServerProcess(
            None, *etcd_flags, *flags, rate_limit=rate_limit, log_path=tmp_path / f"server-{n}.log"
        )
        started.append(srv.start())
        return srv

    yield start
    for s in started:
        s.kill()

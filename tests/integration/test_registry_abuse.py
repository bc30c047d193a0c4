"""One hostile client against a real discovery-service with default limits, beside a normal one.

The attacker (one loopback address, through ``discovery.abuse``'s relay) fills a cluster of its
own to the affiliate limit, then for 20 s opens Watch streams it never reads, sends Hellos
with a new version string each time and updates with 1 MiB ids. The normal client's calls must
all succeed and the server's memory, log and /metrics must stay bounded. The figures against
targets are in ``bench/registry_abuse.py``; the bounds here are loose so the test cannot flake.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from discovery import abuse, hostile
from discovery.limits import AFFILIATES_PER_CLUSTER_MAX, RATE_LIMIT_PER_SECOND
from discovery.testing import ServerProcess

pytestmark = pytest.mark.timeout(180)

RSS_GROWTH_BOUND_MIB = 200
LOG_GROWTH_BOUND = 4 << 20
METRICS_BOUND = 256 << 10


async def test_one_hostile_ip_cannot_exhaust_the_registry(
    discovery_server: Callable[..., ServerProcess],
) -> None:
    srv = discovery_server(rate_limit=RATE_LIMIT_PER_SECOND)
    filled = await hostile.fill_cluster(
        srv.target,
        abuse.EVIL_CLUSTER,
        AFFILIATES_PER_CLUSTER_MAX,
        abuse.fill_sources(AFFILIATES_PER_CLUSTER_MAX),
    )
    assert filled == AFFILIATES_PER_CLUSTER_MAX

    report = await abuse.run(srv, list(abuse.ATTACKS), seconds=20)
    print(report.describe())

    assert report.legit.failures == 0, report.legit.codes
    assert report.legit.codes.get("OK", 0) > 20
    assert report.rss_growth_mib <= RSS_GROWTH_BOUND_MIB
    assert report.log_growth_bytes <= LOG_GROWTH_BOUND
    assert report.metrics_bytes <= METRICS_BOUND
    # every attack was answered, and mostly refused
    for name, tally in report.attacks.items():
        assert sum(tally.codes.values()) > 0, name
    assert srv.proc is not None and srv.proc.poll() is None

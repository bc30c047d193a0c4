"""Registry under attack: one hostile client address against default limits, one attack at a time.

For each attack in ``discovery.abuse.ATTACKS`` a fresh discovery-service (default flags and
rate limits, journal on disk) gets a cluster filled to 1,024 max-size affiliates, then the
attacker runs for ``--seconds`` while a normal client on another address publishes, lists
and watches. Printed per attack: the server's peak RSS growth and the normal client's p99
latency, beside the targets (RSS growth <= 100 MiB, p99 <= 50 ms); "none" is the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from discovery import abuse, hostile
from discovery.limits import AFFILIATES_PER_CLUSTER_MAX, RATE_LIMIT_PER_SECOND
from discovery.testing import ServerProcess

TARGET_RSS_GROWTH_MIB = 100.0
TARGET_P99_MS = 50.0


async def one(name: str, attacks: list[str], seconds: float) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp) / "state", rate_limit=RATE_LIMIT_PER_SECOND, log_path=Path(tmp) / "log")
        with srv:
            n = AFFILIATES_PER_CLUSTER_MAX
            await hostile.fill_cluster(srv.target, abuse.EVIL_CLUSTER, n, abuse.fill_sources(n))
            report = await abuse.run(srv, attacks, seconds)
    print(f"{name}: {report.describe()}")
    p99 = report.legit.p99_ms()
    ok = (
        report.rss_growth_mib <= TARGET_RSS_GROWTH_MIB and p99 <= TARGET_P99_MS and report.legit.failures == 0
    )
    print(
        f"RESULT registry_abuse attack={name} rss_growth_mib={report.rss_growth_mib:.1f} "
        f"target<={TARGET_RSS_GROWTH_MIB:g} p99_ms={p99:.1f} target<={TARGET_P99_MS:g} "
        f"normal_failures={report.legit.failures} {'PASS' if ok else 'MISS'}",
        flush=True,
    )
    return ok


async def main_async(names: list[str], seconds: float) -> int:
    results = [await one("none", [], seconds)]
    for name in names:
        results.append(await one(name, [name], seconds))
    return 0 if all(results) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each attack")
    ap.add_argument("--attack", action="append", choices=sorted(abuse.ATTACKS), help="default: every attack")
    ns = ap.parse_args()
    asyncio.run(main_async(ns.attack or list(abuse.ATTACKS), ns.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

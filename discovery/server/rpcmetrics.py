"""go-grpc-middleware style RPC metrics without a lock per increment.

The handlers run on one event loop, so plain integer counters are safe there;
the Prometheus collector reads them at scrape time (metrics are served from the
same loop).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

BUCKETS = (0.01, 0.1, 0.25, 0.5, 1.0, 2.5)


class MethodStats:
    __slots__ = ("buckets", "codes", "count_sum", "started")

    def __init__(self) -> None:
        self.started = 0
        self.codes: dict[str, int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.count_sum = 0.0

    def done(self, code: str, seconds: float) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.count_sum += seconds


class RpcMetrics:
    """``grpc_server_started_total``, ``grpc_server_handled_total``, ``grpc_server_handling_seconds``."""

    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        self.service = service
        self.methods: dict[tuple[str, str], MethodStats] = {}
        registry.register(self)

    def method(self, kind: str, name: str) -> MethodStats:
        m = self.methods.get((kind, name))
        if m is None:
            m = self.methods[(kind, name)] = MethodStats()
        return m

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        started = CounterMetricFamily("grpc_server_started", "RPCs started on the server.", labels=labels)
        handled = CounterMetricFamily(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            labels=[*labels, "grpc_code"],
        )
        hist = HistogramMetricFamily(
            "grpc_server_handling_seconds", "Response latency of RPCs handled by the server.", labels=labels
        )
        for (kind, name), m in sorted(self.methods.items()):
            lv = [kind, self.service, name]
            started.add_metric(lv, m.started)
            for code, n in sorted(m.codes.items()):
                handled.add_metric([*lv, code], n)
            cumulative, acc = [], 0
            for bound, n in zip((*map(str, BUCKETS), "+Inf"), m.buckets, strict=True):
                acc += n
                cumulative.append((bound, acc))
            hist.add_metric(lv, cumulative, m.count_sum)
        yield started
        yield handled
        yield hist

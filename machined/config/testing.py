"""Test helpers for the machine config: a manual clock/timer and small valid configs."""

from __future__ import annotations

import base64
import heapq
import itertools
import os
from collections.abc import Callable, Sequence

from machined.config import yamlio


class ManualTimer:
    """A clock that moves only when told; ``call_later`` callbacks run from :meth:`advance`."""

    class _Handle:
        def __init__(self) -> None:
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._heap: list[tuple[float, int, ManualTimer._Handle, Callable[[], None]]] = []

    def now(self) -> float:
        return self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> ManualTimer._Handle:
        h = ManualTimer._Handle()
        heapq.heappush(self._heap, (self._now + delay, next(self._seq), h, callback))
        return h

    def advance(self, seconds: float) -> None:
        """Move the clock forward, running every due callback in deadline order."""
        target = self._now + seconds
        while self._heap and self._heap[0][0] <= target:
            when, _, h, cb = heapq.heappop(self._heap)
            self._now = max(self._now, when)
            if not h.cancelled:
                cb()
        self._now = target

    @property
    def scheduled(self) -> int:
        """Timers still waiting (not cancelled)."""
        return sum(1 for *_, h, _cb in self._heap if not h.cancelled)


def new_secret() -> str:
    """A fresh cluster secret (base64 of 32 random bytes), as ``talosctl gen secrets``."""
    return base64.b64encode(os.urandom(32)).decode()


def config_yaml(
    *,
    cluster_id: str = "test-cluster",
    secret: str | None = None,
    discovery: Sequence[str] = ("http://127.0.0.1:3000",),
    kubespan: bool = True,
    agent: dict[str, object] | None = None,
    services: Sequence[dict[str, object]] = (),
    machine_type: str = "worker",
) -> str:
    """A small valid config: v1alpha1 + KubeSpanConfig + one DiscoveryServiceConfig per URL +
    AgentConfig (``agent`` fields) + ServiceConfigs (each a dict of fields; ``name`` required)."""
    docs: list[dict[str, object]] = [
        {
            "version": "v1alpha1",
            "machine": {"type": machine_type},
            "cluster": {
                "id": cluster_id,
                "secret": secret or new_secret(),
                "clusterName": "test",
            },
        },
        {"apiVersion": "v1alpha1", "kind": "KubeSpanConfig", "enabled": kubespan},
    ]
    for i, url in enumerate(discovery):
        docs.append(
            {"apiVersion": "v1alpha1", "kind": "DiscoveryServiceConfig", "name": f"ds{i}", "endpoint": url}
        )
    if agent is not None:
        docs.append({"apiVersion": "v1alpha1", "kind": "AgentConfig", **agent})
    for svc in services:
        docs.append({"apiVersion": "v1alpha1", "kind": "ServiceConfig", **svc})
    return yamlio.dump_documents(docs)

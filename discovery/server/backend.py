"""The registry's store interface: what :class:`~discovery.server.service.ClusterService` awaits.

Two implementations: :class:`EmbeddedBackend` (the in-memory :class:`Registry` with the journal and
snapshots of :class:`~discovery.server.storage.Store`; one process) and
:class:`discovery.server.etcdstore.EtcdBackend` (any number of stateless replicas on etcd). Both
validate with :class:`Registry`'s rules, so a bad request gets the same error on either, and both hand
out :class:`~discovery.server.state.Subscription` s (snapshot + queued changes) for Watch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from discovery.limits import Limits
from discovery.server.state import AffiliateView, GcStats, Registry, Subscription
from discovery.server.storage import StorageUnavailable, Store

__all__ = ["Backend", "EmbeddedBackend", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The store cannot answer now (etcd unreachable, journal unwritable): nothing was changed, or the
    outcome is unknown; the client should retry. The service answers UNAVAILABLE."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@runtime_checkable
class Backend(Protocol):
    """One registry store. Mutations return once durable (journalled, or committed by etcd) and visible
    to :meth:`list` and new subscriptions on the same backend."""

    @property
    def limits(self) -> Limits: ...

    def validate_ids(self, cluster_id: str, affiliate_id: str | None = None) -> None: ...

    async def update(
        self, cluster_id: str, affiliate_id: str, data: bytes | None, endpoints: Sequence[bytes], ttl: float
    ) -> bool: ...

    async def delete(self, cluster_id: str, affiliate_id: str) -> bool: ...

    async def list(self, cluster_id: str) -> list[AffiliateView]: ...

    async def subscribe(self, cluster_id: str) -> Subscription: ...

    def stats(self) -> tuple[int, int, int, int]: ...

    def gc(self) -> GcStats: ...

    def health(self) -> str | None:
        """None when the store can take writes, else why not (for /healthz and gRPC health)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class EmbeddedBackend:
    """Today's single-process store: :class:`Registry` in memory, every mutation journalled first by
    ``store`` (None: no persistence). The async methods run the synchronous calls directly."""

    kind = "embedded"

    def __init__(self, registry: Registry, store: Store | None = None) -> None:
        self.registry = registry
        self.store = store

    @property
    def limits(self) -> Limits:
        return self.registry.limits

    def validate_ids(self, cluster_id: str, affiliate_id: str | None = None) -> None:
        self.registry.validate_ids(cluster_id, affiliate_id)

    async def update(
        self, cluster_id: str, affiliate_id: str, data: bytes | None, endpoints: Sequence[bytes], ttl: float
    ) -> bool:
        return self.update_now(cluster_id, affiliate_id, data, endpoints, ttl)

    def update_now(
        self, cluster_id: str, affiliate_id: str, data: bytes | None, endpoints: Sequence[bytes], ttl: float
    ) -> bool:
        """:meth:`update` without a coroutine (the service's fast path)."""
        try:
            return self.registry.update(cluster_id, affiliate_id, data, endpoints, ttl, self.store)
        except StorageUnavailable as e:
            raise StoreUnavailable(f"registry storage unavailable: {e.reason}") from None

    async def delete(self, cluster_id: str, affiliate_id: str) -> bool:
        return self.delete_now(cluster_id, affiliate_id)

    def delete_now(self, cluster_id: str, affiliate_id: str) -> bool:
        try:
            return self.registry.delete(cluster_id, affiliate_id, self.store)
        except StorageUnavailable as e:
            raise StoreUnavailable(f"registry storage unavailable: {e.reason}") from None

    async def list(self, cluster_id: str) -> list[AffiliateView]:
        return self.registry.list(cluster_id)

    async def subscribe(self, cluster_id: str) -> Subscription:
        return self.registry.subscribe(cluster_id)

    def stats(self) -> tuple[int, int, int, int]:
        return self.registry.stats()

    def gc(self) -> GcStats:
        return self.registry.gc()

    def health(self) -> str | None:
        return self.store.degraded if self.store is not None else None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

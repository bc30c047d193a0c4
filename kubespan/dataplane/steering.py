"""Steering "routes" behind the engine's nftables port.

The engine hands its target sets (the peers' routed prefixes by family) to one port. With steering
"marks" that port is :class:`~kubespan.dataplane.nft.NftManager` (the sets drive the marking
chains). With "routes" it is :class:`RouteSteering`: the same sets become routes via the mesh link
in the mesh table (:meth:`LinkManager.reconcile_prefix_routes`), and the nftables table keeps only
the forward MSS clamp, its sets empty. Nothing of the mesh then runs per packet on the node's own
traffic: one ``not fwmark`` rule and a lookup in a small table (docs/design/nft-ruleset.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from kubespan.dataplane.ruleset import SET_IPV4, SET_IPV6, normalize_desired
from spanutil.ipcodec import IPNetwork

if TYPE_CHECKING:
    from kubespan.ports import NftPort


class PrefixRoutes(Protocol):
    async def reconcile_prefix_routes(
        self, desired: Mapping[int, Sequence[IPNetwork]], *, trust_cache: bool = False
    ) -> list[str]: ...


class RouteSteering:
    """:class:`~kubespan.ports.NftPort` for steering "routes": sets in, prefix routes and the
    clamp-only table out (in that order: the table first, as with marks)."""

    what = "prefix routes"

    def __init__(self, routes: PrefixRoutes, nft: NftPort) -> None:
        self.routes, self.nft = routes, nft

    async def reconcile(
        self,
        desired_sets: Mapping[str, Iterable[Any]],
        *,
        trust_cache: bool = False,
        normalized: bool = False,
    ) -> list[str]:
        """The changes made to the table and the routes (empty: nothing written)."""
        sets = desired_sets if normalized else normalize_desired(desired_sets)
        changes = await self.nft.reconcile({}, trust_cache=trust_cache, normalized=True)
        by_family = {4: sets.get(SET_IPV4, ()), 6: sets.get(SET_IPV6, ())}  # copied by the routes
        return changes + await self.routes.reconcile_prefix_routes(by_family, trust_cache=trust_cache)

    async def teardown(self) -> None:
        """The table; the routes go with the link manager's teardown (the engine runs both)."""
        await self.nft.teardown()

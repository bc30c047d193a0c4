"""The mesh's kernel data plane: link addresses, policy routing (pyroute2) and nftables (``nft -j``).

- :class:`LinkManager` — MTU/up/addresses of the mesh link, the IPv4/IPv6 default routes (or, with
  steering "routes", a route per peer prefix) in the mesh routing table, the fwmark rules; plus an
  rtnetlink event watcher.
- :class:`NftManager` — the dedicated ``inet`` table: named interval sets of mesh destinations,
  marking/MSS-clamping chains, updated by set-element diff in one transaction per reconcile
  (ruleset rendering in :mod:`~kubespan.dataplane.ruleset`, the in-process libnftables binding in
  :mod:`~kubespan.dataplane.libnftables`).
- :class:`RouteSteering` — steering "routes": the same target sets as routes in the mesh table
  (``LinkManager.reconcile_prefix_routes``) behind the engine's nftables port; the table keeps only
  the forward clamp.
- :mod:`kubespan.dataplane.fake` — in-memory fakes of both for unit tests (a test-support module:
  production code never imports it).

Every ``reconcile*`` is level-triggered and idempotent and returns the list of changes it made.
"""

from kubespan.dataplane.links import (
    DataplaneError,
    LinkManager,
    LinkNotFoundError,
    NetlinkEvent,
)
from kubespan.dataplane.nft import NftError, NftManager, Transaction
from kubespan.dataplane.ruleset import SET_IPV4, SET_IPV6, RulesetParams, targets
from kubespan.dataplane.steering import RouteSteering

__all__ = [
    "SET_IPV4",
    "SET_IPV6",
    "DataplaneError",
    "LinkManager",
    "LinkNotFoundError",
    "NetlinkEvent",
    "NftError",
    "NftManager",
    "RouteSteering",
    "RulesetParams",
    "Transaction",
    "targets",
]

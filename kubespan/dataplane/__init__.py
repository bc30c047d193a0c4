"""The mesh's kernel data plane: link addresses, policy routing (pyroute2) and nftables (``nft -j``).

- :class:`LinkManager` — MTU/up/addresses of the mesh link, the IPv4/IPv6 default routes in the
  mesh routing table, the ``fwmark F/M lookup T`` rules; plus an rtnetlink event watcher.
- :class:`NftManager` — the dedicated ``inet`` table: named interval sets of mesh destinations,
  marking/MSS-clamping chains, updated by set-element diff in one transaction per reconcile
  (ruleset rendering in :mod:`~kubespan.dataplane.ruleset`, the in-process libnftables binding in
  :mod:`~kubespan.dataplane.libnftables`).
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

__all__ = [
    "SET_IPV4",
    "SET_IPV6",
    "DataplaneError",
    "LinkManager",
    "LinkNotFoundError",
    "NetlinkEvent",
    "NftError",
    "NftManager",
    "RulesetParams",
    "Transaction",
    "targets",
]

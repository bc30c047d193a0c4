"""The end-to-end-encrypted relay: a WireGuard-aware UDP forwarder that a reachable node runs for peers
that cannot reach each other directly (issue 14; design in docs/design/relay.md).

:mod:`~kubespan.relay.wgmsg` classifies WireGuard messages and checks mac1, :mod:`~kubespan.relay.allocation`
decides per datagram (pure), :mod:`~kubespan.relay.forwarder` owns the sockets, and ``python -m
kubespan.relay`` runs a standalone forwarder.
"""

from kubespan.relay.allocation import Allocation, Counters, Drop, Limits
from kubespan.relay.forwarder import Forwarder, RelayError, RelayLimits

__all__ = ["Allocation", "Counters", "Drop", "Forwarder", "Limits", "RelayError", "RelayLimits"]

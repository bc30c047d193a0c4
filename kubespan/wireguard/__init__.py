"""WireGuard backends behind one interface.

:class:`WireGuardBackend` is what the mesh engine codes against; :func:`sync`
diffs desired against observed state and applies only the difference.
Implementations: ``userspace`` (:class:`UserspaceBackend`, a supervised
wireguard-go configured over UAPI by :class:`UapiClient`), ``kernel``
(:mod:`kubespan.wireguard.kernel`, generic netlink). The in-memory fake is
in :mod:`kubespan.wireguard.fake`, a test-support module this package does not import.
The value types are in :mod:`~kubespan.wireguard.types`, the desired-vs-observed diff in
:mod:`~kubespan.wireguard.diff`, the UAPI text codec in :mod:`~kubespan.wireguard.uapi`.
"""

from kubespan.wireguard.backend import WireGuardBackend, WireGuardError, sync
from kubespan.wireguard.userspace import UapiClient, UserspaceBackend

__all__ = [
    "UapiClient",
    "UserspaceBackend",
    "WireGuardBackend",
    "WireGuardError",
    "sync",
]

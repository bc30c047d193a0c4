"""apid: the mTLS gateway in front of machined's unix-socket API (see README.md in this package)."""

from .proxy import APID_PORT, Proxy, backend_target, method_kind
from .rules import RULES, allowed, effective_roles, required_roles
from .tls import Identity

__all__ = [
    "APID_PORT",
    "RULES",
    "Identity",
    "Proxy",
    "allowed",
    "backend_target",
    "effective_roles",
    "method_kind",
    "required_roles",
]

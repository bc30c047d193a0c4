"""apid: the mTLS gateway in front of machined's unix-socket API (see README.md in this package)."""

from machined.api.roles import RULES, allowed, required_roles

from .channels import ChannelCache
from .proxy import APID_PORT, Proxy, backend_target, method_kind
from .rules import effective_roles
from .tls import Identity

__all__ = [
    "APID_PORT",
    "RULES",
    "ChannelCache",
    "Identity",
    "Proxy",
    "allowed",
    "backend_target",
    "effective_roles",
    "method_kind",
    "required_roles",
]

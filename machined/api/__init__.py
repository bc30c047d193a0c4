"""machined's API: ``machine.MachineService`` (:mod:`.machine`) and the read-only resource API
``cosi.resource.State`` (:mod:`.resources`) on a unix socket (:mod:`.server`), with Talos's roles
(:mod:`.roles`) and reply envelope (:mod:`.envelope`)."""

from .envelope import metadata, node_error
from .machine import NOT_OS, MachineServicer, Node
from .resources import WRITE_DENIED, StateServicer, write_refusal_handler
from .roles import ROLE_METADATA, RULES, allowed, parse_roles, roles_from_metadata

__all__ = [
    "NOT_OS",
    "ROLE_METADATA",
    "RULES",
    "WRITE_DENIED",
    "MachineServicer",
    "Node",
    "StateServicer",
    "allowed",
    "metadata",
    "node_error",
    "parse_roles",
    "roles_from_metadata",
    "write_refusal_handler",
]

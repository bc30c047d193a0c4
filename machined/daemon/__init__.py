"""The machined daemon: :class:`Agent` wires config, mesh, resources, services and the API."""

from .agent import Agent, AgentError, AgentOptions
from .events import MachineEvent, MachineEvents, xid
from .meshhost import MeshHost, real_factory
from .netinfo import NetlinkInfo, StaticNetInfo

__all__ = [
    "Agent",
    "AgentError",
    "AgentOptions",
    "MachineEvent",
    "MachineEvents",
    "MeshHost",
    "NetlinkInfo",
    "StaticNetInfo",
    "real_factory",
    "xid",
]

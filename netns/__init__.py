"""Network-namespace lab for tests, benchmarks and the demo (never imported by product code)."""

from netns.errors import LabError, NetemUnavailableError
from netns.impair import Handle, netem_available
from netns.lab import Lab, LabProcess, Node, PortForward, Router, cleanup_stale, list_netns
from netns.probe import PingResult, Transfer, UdpEcho, ping, tcp_transfer, udp_echo, udp_mapped

__all__ = [
    "Handle",
    "Lab",
    "LabError",
    "LabProcess",
    "NetemUnavailableError",
    "Node",
    "PingResult",
    "PortForward",
    "Router",
    "Transfer",
    "UdpEcho",
    "cleanup_stale",
    "list_netns",
    "netem_available",
    "ping",
    "tcp_transfer",
    "udp_echo",
    "udp_mapped",
]

"""Asyncio discovery client: publish the local affiliate and watch the cluster on one or more endpoints."""

from discovery.client.backoff import ExponentialBackoff, jitter, next_interval, schedule
from discovery.client.client import (
    ClientStats,
    DiscoveredAffiliate,
    DiscoveryClient,
    EndpointStatus,
    OnChange,
    RedirectLoopError,
    WatchEndedError,
)
from discovery.client.replicas import Replica, ReplicaRotation, resolve_replicas
from discovery.client.target import (
    DiscoveryTarget,
    parse_endpoint_replicas,
    parse_endpoint_url,
    redirect_target,
)

__all__ = [
    "ClientStats",
    "DiscoveredAffiliate",
    "DiscoveryClient",
    "DiscoveryTarget",
    "EndpointStatus",
    "ExponentialBackoff",
    "OnChange",
    "RedirectLoopError",
    "Replica",
    "ReplicaRotation",
    "WatchEndedError",
    "jitter",
    "next_interval",
    "parse_endpoint_replicas",
    "parse_endpoint_url",
    "redirect_target",
    "resolve_replicas",
    "schedule",
]

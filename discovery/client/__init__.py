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
from discovery.client.target import DiscoveryTarget, parse_endpoint_url, redirect_target

__all__ = [
    "ClientStats",
    "DiscoveredAffiliate",
    "DiscoveryClient",
    "DiscoveryTarget",
    "EndpointStatus",
    "ExponentialBackoff",
    "OnChange",
    "RedirectLoopError",
    "WatchEndedError",
    "jitter",
    "next_interval",
    "parse_endpoint_url",
    "redirect_target",
    "schedule",
]

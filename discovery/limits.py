"""Protocol limits and defaults shared by the discovery server and client.

Values match the upstream (Talos) discovery service so that real Talos nodes
see the same behaviour; every server-side limit is configurable.
"""

from __future__ import annotations

from dataclasses import dataclass

CLUSTER_ID_MAX = 256  # bytes (UTF-8), minimum 1
AFFILIATE_ID_MAX = 256  # bytes (UTF-8), minimum 1
AFFILIATE_DATA_MAX = 2048  # bytes of ciphertext
ENDPOINT_MAX = 32  # bytes of one encrypted endpoint blob (a multiple of 16)
ENDPOINTS_PER_AFFILIATE_MAX = 64
AFFILIATES_PER_CLUSTER_MAX = 1024
TTL_MAX_SECONDS = 30 * 60.0
WATCH_BUFFER = 32  # notifications queued for one watcher before it is aborted
# ... or bytes of queued notifications (affiliate sizes): with the limits above 32 notifications are
# at most ~140 KiB, so this only binds when watch_buffer or the size limits are raised.
WATCH_BUFFER_BYTES = 256 << 10
RATE_LIMIT_PER_SECOND = 15.0
RATE_LIMIT_BURST = 60

DEFAULT_TTL_SECONDS = TTL_MAX_SECONDS  # what Talos sends
GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16
AFFILIATE_PLAINTEXT_MAX = AFFILIATE_DATA_MAX - GCM_NONCE_SIZE - GCM_TAG_SIZE  # 2020


@dataclass(frozen=True, slots=True)
class Limits:
    """Server-side limits; defaults are upstream's."""

    cluster_id_max: int = CLUSTER_ID_MAX
    affiliate_id_max: int = AFFILIATE_ID_MAX
    affiliate_data_max: int = AFFILIATE_DATA_MAX
    endpoint_max: int = ENDPOINT_MAX
    endpoints_per_affiliate_max: int = ENDPOINTS_PER_AFFILIATE_MAX
    affiliates_per_cluster_max: int = AFFILIATES_PER_CLUSTER_MAX
    ttl_max: float = TTL_MAX_SECONDS
    watch_buffer: int = WATCH_BUFFER
    watch_buffer_bytes: int = WATCH_BUFFER_BYTES


DEFAULT_LIMITS = Limits()

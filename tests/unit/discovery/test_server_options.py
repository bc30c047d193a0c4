"""discovery-service's gRPC server options as its flags give them."""

from __future__ import annotations

from discovery.server.main import GRPC_OPTIONS, KEEPALIVE_TIME, KEEPALIVE_TIMEOUT, parse_args, server_options


def test_default_flags_give_keepalive_that_drops_a_half_open_client_within_a_minute() -> None:
    """The keepalive flags' defaults reach the server unchanged: a ping after 30 s without traffic,
    20 s to answer it (every ping's timeout too), so a half-open client's watches go within ~50 s.
    tests/integration/test_watch_bounds.py shows grpc-core acting on these options, with 1 s each."""
    opts = dict(server_options(parse_args([])))
    assert server_options(parse_args([])) == GRPC_OPTIONS
    assert KEEPALIVE_TIME + KEEPALIVE_TIMEOUT <= 55
    assert opts["grpc.keepalive_time_ms"] == KEEPALIVE_TIME * 1000
    assert opts["grpc.keepalive_timeout_ms"] == opts["grpc.http2.ping_timeout_ms"] == KEEPALIVE_TIMEOUT * 1000
    assert opts["grpc.keepalive_permit_without_calls"] == 1 and opts["grpc.http2.max_pings_without_data"] == 0
    short = dict(server_options(parse_args(["--keepalive-time", "1s", "--keepalive-timeout", "2s"])))
    assert short["grpc.keepalive_time_ms"] == 1000 and short["grpc.http2.ping_timeout_ms"] == 2000

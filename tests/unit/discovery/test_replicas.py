"""Replica lists in endpoint URLs, name resolution into replicas, and the failover order (with fakes)."""

from __future__ import annotations

import asyncio
import socket

import grpc
import grpc.aio
import pytest

from discovery.client import DiscoveryClient
from discovery.client.replicas import Replica, ReplicaRotation, is_failover_error, resolve_replicas
from discovery.client.target import DiscoveryTarget, parse_endpoint_replicas, parse_endpoint_url

pytestmark = pytest.mark.timeout(20)


def t(host: str, port: int, secure: bool = True) -> DiscoveryTarget:
    return DiscoveryTarget(host, port, secure)


# --- URL parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://10.0.0.1:3000,10.0.0.2:3000,[fd00::3]:3000",
            (t("10.0.0.1", 3000), t("10.0.0.2", 3000), t("fd00::3", 3000)),
        ),
        ("https://a.example,b.example:8443/", (t("a.example", 443), t("b.example", 8443))),
        ("grpc://a.example:1, b.example:2", (t("a.example", 1), t("b.example", 2))),
        ("http://10.0.0.1,10.0.0.2:3000", (t("10.0.0.1", 80, False), t("10.0.0.2", 3000, False))),
        ("10.0.0.1:3000,[::1]:3001", (t("10.0.0.1", 3000, False), t("::1", 3001, False))),
        # every one-host form still works
        ("https://discovery.talos.dev/", (t("discovery.talos.dev", 443),)),
        ("http://10.0.0.1", (t("10.0.0.1", 80, False),)),
        ("[fd00::1]:3000", (t("fd00::1", 3000, False),)),
    ],
)
def test_replica_lists_parse(url: str, expected: tuple[DiscoveryTarget, ...]) -> None:
    assert parse_endpoint_replicas(url) == expected


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://a.example,,b.example", "replica 2 is empty"),
        ("https://a.example,", "replica 2 is empty"),
        ("https://,a.example", "replica 1 is empty"),
        ("https://a.example,http://b.example", "replica 2 ('http://b.example'): one scheme"),
        ("https://a.example,b.example/x", "replica 2 ('b.example/x'): paths are not supported"),
        ("https://a.example,a.example:443", "replica 2 ('a.example:443'): listed twice"),
        ("a.example:1,b.example", "replica 2 ('b.example'): a bare endpoint needs a port"),
        ("https://a.example:0,b.example", "replica 1 ('a.example:0'): port 0"),
        ("https://a.example,b.example:x", "replica 2 ('b.example:x')"),
        ("https://a.example,[fd00::1", "replica 2 ('[fd00::1')"),
        ("ftp://a.example,b.example", "unsupported scheme 'ftp'"),
    ],
)
def test_bad_replica_lists_name_the_entry(url: str, says: str) -> None:
    with pytest.raises(ValueError, match="discovery endpoint") as e:
        parse_endpoint_replicas(url)
    assert says in str(e.value)


def test_one_host_parser_refuses_a_list() -> None:
    with pytest.raises(ValueError, match="host list"):
        parse_endpoint_url("https://a.example,b.example")


def test_client_takes_a_list_and_checks_it() -> None:
    kw = {"cluster_id": "c", "secret": bytes(32), "affiliate_id": "me"}
    c = DiscoveryClient(["http://127.0.0.1:1,127.0.0.1:2"], **kw)
    st = c.endpoint_status()["http://127.0.0.1:1,127.0.0.1:2"]
    assert st.target == "127.0.0.1:1" and st.replica is None and not st.connected
    with pytest.raises(ValueError, match="replica 2 is empty"):
        DiscoveryClient(["http://127.0.0.1:1,"], **kw)


# --- resolution ----------------------------------------------------------------------------------------


class FakeResolver:
    def __init__(self, table: dict[str, list[str] | OSError]) -> None:
        self.table = table
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        got = self.table[host]
        if isinstance(got, OSError):
            raise got
        return list(got)


async def test_every_address_of_a_name_is_a_replica() -> None:
    r = FakeResolver({"reg.example": ["10.0.0.1", "fd00::1", "10.0.0.1", "10.0.0.2"]})
    name = t("reg.example", 3000)
    got = await resolve_replicas([name, t("10.9.9.9", 3001)], r)
    assert [x.target for x in got] == ["10.0.0.1:3000", "[fd00::1]:3000", "10.0.0.2:3000", "10.9.9.9:3001"]
    assert all(x.by_name for x in got[:3]) and not got[3].by_name
    assert got[1].name == name  # TLS is verified against the name
    assert r.calls == [("reg.example", 3000)]  # IP literals are not resolved


async def test_unresolvable_names_are_skipped_unless_all_are() -> None:
    err = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    r = FakeResolver({"gone.example": err, "ok.example": ["10.0.0.5"]})
    got = await resolve_replicas([t("gone.example", 1), t("ok.example", 1)], r)
    assert [x.target for x in got] == ["10.0.0.5:1"]
    with pytest.raises(socket.gaierror):
        await resolve_replicas([t("gone.example", 1)], r)


async def test_system_resolver_localhost() -> None:
    got = await resolve_replicas([t("localhost", 3000, False)])
    assert "127.0.0.1:3000" in {x.target for x in got}


# --- failover order ------------------------------------------------------------------------------------


def reps(*addrs: str) -> list[Replica]:
    return [Replica(t("reg.example", 3000), a) for a in addrs]


def drain(rot: ReplicaRotation) -> list[str]:
    out = []
    while (r := rot.next()) is not None:
        out.append(r.address)
    return out


def test_first_round_in_order() -> None:
    rot = ReplicaRotation()
    rot.begin_round(reps("a", "b", "c"))
    assert rot.untried == 3
    assert drain(rot) == ["a", "b", "c"] and rot.current is not None and rot.current.address == "c"


def test_dead_replica_moves_to_the_next_and_wraps() -> None:
    rot = ReplicaRotation()
    rot.begin_round(reps("a", "b", "c"))
    assert rot.next().address == "a"  # type: ignore[union-attr]
    # a served, then died: the next round starts after it, without it
    rot.begin_round(reps("a", "b", "c"), skip_current=True)
    assert drain(rot) == ["b", "c"]
    # both failed: after backoff a full round starts after the last one tried
    rot.begin_round(reps("a", "b", "c"))
    assert drain(rot) == ["a", "b", "c"]


def test_rotation_follows_the_one_in_use() -> None:
    rot = ReplicaRotation()
    rot.begin_round(reps("a", "b", "c"))
    rot.next()
    rot.next()  # b in use
    rot.begin_round(reps("a", "b", "c"), skip_current=True)
    assert drain(rot) == ["c", "a"]


def test_single_replica_round_is_empty_after_its_death() -> None:
    rot = ReplicaRotation()
    rot.begin_round(reps("a"))
    rot.next()
    rot.begin_round(reps("a"), skip_current=True)
    assert rot.untried == 0 and rot.next() is None  # the session backs off, then retries it
    rot.begin_round(reps("a"))
    assert drain(rot) == ["a"]


def test_re_resolution_changes_the_set() -> None:
    rot = ReplicaRotation()
    rot.begin_round(reps("a", "b"))
    rot.next()
    # a died and DNS now lists c and d instead of b; a is still listed
    rot.begin_round(reps("c", "a", "d"), skip_current=True)
    assert drain(rot) == ["d", "c"]
    # the last one tried vanished from DNS: start from the beginning
    rot.begin_round(reps("x", "y"))
    assert drain(rot) == ["x", "y"]


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


@pytest.mark.parametrize(
    ("exc", "failover"),
    [
        (_rpc_error(grpc.StatusCode.UNAVAILABLE), True),
        (_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), True),
        (_rpc_error(grpc.StatusCode.CANCELLED), True),
        (_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED), False),
        (_rpc_error(grpc.StatusCode.INVALID_ARGUMENT), False),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (ValueError(), False),
    ],
)
def test_failover_errors(exc: BaseException, failover: bool) -> None:
    assert is_failover_error(exc) is failover


async def test_session_fails_over_through_refused_replicas(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens on the first two ports: the session tries all three at once, then backs off."""
    ports = []
    socks = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        socks.append(s)
    for s in socks:
        s.close()  # bound then closed: connections are refused
    url = "http://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    c = DiscoveryClient(
        [url], cluster_id="c", secret=bytes(32), affiliate_id="me", backoff_initial=5, backoff_max=5
    )
    caplog.set_level("INFO", logger="discovery.client")
    async with c:
        for _ in range(200):
            if c.stats.failovers >= 2 and c.endpoint_status()[url].replica == f"127.0.0.1:{ports[2]}":
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert c.stats.failovers == 2 and c.stats.reconnects == 0  # all three tried, then backoff
        st = c.endpoint_status()[url]
        assert st.replicas == 3 and "UNAVAILABLE" in (st.last_error or "")
    moves = [r._fields for r in caplog.records if r.getMessage() == "discovery replica failover"]  # type: ignore[attr-defined]
    assert [(m["from"], m["to"]) for m in moves] == [
        (f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"),
        (f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}"),
    ]
    assert all("UNAVAILABLE" in m["reason"] for m in moves)

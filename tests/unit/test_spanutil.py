"""spanutil: the one duration grammar, the one size grammar, the one byte<->IP codec, the test poller."""

from __future__ import annotations

import argparse
import ipaddress

import pytest

from spanutil.durations import DurationError, parse_duration
from spanutil.ipcodec import (
    IPAddress,
    IPNetwork,
    ip_from_bytes,
    ip_to_bytes,
    ip_without_scope,
    is_node_address,
)
from spanutil.sizes import SizeError, parse_size
from spanutil.testing import eventually

# Every form the three former parsers accepted (discovery-service flags, spanctl flags, machined
# config fields), one grammar now.
GOOD = [
    # Go durations (machined config; the flags accepted the ms/s/m/h subset)
    ("5s", 5.0),
    ("500ms", 0.5),
    ("1m30s", 90.0),
    ("10m30s", 630.0),
    ("1h", 3600.0),
    ("1h2m3.5s", 3723.5),
    ("1.5s", 1.5),
    ("1.s", 1.0),
    (".5s", 0.5),
    ("250us", 0.00025),
    ("250µs", 0.00025),
    ("250μs", 0.00025),
    ("10ns", 1e-8),
    ("8760h", 8760 * 3600.0),
    ("1m1m", 120.0),
    ("0s", 0.0),
    (" 30s ", 30.0),
    # plain seconds (the flags; config had only "0")
    ("0", 0.0),
    ("90", 90.0),
    ("1.5", 1.5),
    ("1e3", 1000.0),
    # numbers (YAML values in config)
    (3, 3.0),
    (0.25, 0.25),
]


@pytest.mark.parametrize(("value", "seconds"), GOOD)
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "  ",
        "s",
        "5 s",
        "5 minutes",
        "1d",
        "5x",
        "1.2.3s",
        "-1s",
        "-5",
        "+5s",
        "inf",
        "nan",
        "1e400",
        "1_000",
        ".s",
        True,
        None,
        -1,
        float("nan"),
        float("inf"),
        [1],
    ],
)
def test_bad_durations_name_the_input(bad):
    with pytest.raises(DurationError) as e:
        parse_duration(bad)
    assert repr(bad) in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    ("text", "raw"),
    [
        ("10.1.2.3", b"\x0a\x01\x02\x03"),
        ("0.0.0.0", bytes(4)),
        ("::1", bytes(15) + b"\x01"),
        ("2001:db8::7", bytes.fromhex("20010db8000000000000000000000007")),
        ("::ffff:10.1.2.3", bytes(10) + b"\xff\xff\x0a\x01\x02\x03"),
    ],
)
def test_ip_codec_round_trip(text, raw):
    ip = ipaddress.ip_address(text)
    assert ip_to_bytes(text) == ip_to_bytes(ip) == raw
    back = ip_from_bytes(raw)
    assert back == ip and type(back) is type(ip)  # IPv4-mapped IPv6 stays IPv6, as Go's netip keeps it
    assert ip_from_bytes(bytearray(raw)) == ip
    assert isinstance(back, IPAddress)


@pytest.mark.parametrize("size", [0, 1, 3, 5, 15, 17, 32])
def test_ip_codec_refuses_other_lengths(size):
    with pytest.raises(ValueError, match=f"4 or 16 bytes, got {size}"):
        ip_from_bytes(bytes(size))


def test_ip_codec_refuses_bad_text():
    with pytest.raises(ValueError):
        ip_to_bytes("10.0.0.256")


def test_ip_without_scope_drops_the_zone_only():
    scoped = ipaddress.ip_address("fe80::1%eth0")
    assert scoped != ipaddress.ip_address("fe80::1")  # why callers strip it: the zone takes part in equality
    assert ip_without_scope("fe80::1%eth0") == ipaddress.IPv6Address("fe80::1")
    assert ip_without_scope(scoped) == ipaddress.IPv6Address("fe80::1")  # any object, through str()
    assert ip_without_scope("10.0.0.1") == ipaddress.IPv4Address("10.0.0.1")
    assert ip_without_scope("::ffff:10.0.0.1") == ipaddress.IPv6Address("::ffff:10.0.0.1")
    for bad in ("", "%eth0", "fe80::zz%eth0", "host.example"):
        with pytest.raises(ValueError):
            ip_without_scope(bad)


def test_network_alias():
    assert isinstance(ipaddress.ip_network("10.0.0.0/8"), IPNetwork)
    assert isinstance(ipaddress.ip_network("fd00::/8"), IPNetwork)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("65536", 65536),
        ("0", 0),
        ("64KiB", 64 << 10),
        ("64K", 64 << 10),
        ("64kb", 64 << 10),
        ("8MiB", 8 << 20),
        ("8MB", 8 << 20),
        ("1GiB", 1 << 30),
        (" 1.5KiB ", 1536),
        ("4 MiB", 4 << 20),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "KiB", "64TiB", "lots", "-1KiB", "nan", "inf", "1e400"])
def test_bad_sizes_name_the_input(bad):
    with pytest.raises(SizeError, match="invalid size") as e:
        parse_size(bad)
    assert repr(bad) in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    ("parse", "good", "value", "bad", "message"),
    [
        (parse_duration, "1m30s", 90.0, "5 minutes", "invalid duration '5 minutes'"),
        (parse_size, "2MiB", 2 << 20, "two", "invalid size 'two'"),
    ],
)
def test_flags_show_the_message(parse, good, value, bad, message):
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--flag", type=parse)
    assert p.parse_args(["--flag", good]).flag == value
    with pytest.raises(argparse.ArgumentError, match=message):
        p.parse_args(["--flag", bad])


# --- the test-support poller ------------------------------------------------------------------------


async def test_eventually_returns_the_first_truthy_value_of_a_sync_or_async_predicate() -> None:
    calls = []

    async def third_time() -> str | None:
        calls.append(1)
        return "ready" if len(calls) >= 3 else None

    assert await eventually(third_time, "third call") == "ready" and len(calls) == 3
    assert await eventually(lambda: 7) == 7


async def test_eventually_names_what_it_waited_for_when_it_gives_up() -> None:
    with pytest.raises(AssertionError, match=r"not reached within 0.05 s: the moon"):
        await eventually(lambda: False, "the moon", within=0.05)


@pytest.mark.parametrize(
    ("text", "node"),
    [
        ("192.0.2.7", True),
        ("10.0.0.1", True),
        ("2001:db8::1", True),
        ("fd00::1", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("169.254.1.1", False),
        ("fe80::1", False),
    ],
)
def test_node_addresses_are_neither_loopback_nor_link_local(text: str, node: bool) -> None:
    assert is_node_address(ipaddress.ip_address(text)) is node

"""The lab's UDP reflector (``python -m netns.reflect``) on loopback: it tells each sender the source
address it saw, prints nothing, and exits after its lifetime."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from netns.reflect import ask, format_addr, parse_addr, receive


def free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_reflector_process_answers_with_the_source_address(host: str) -> None:
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    port = free_udp_port(host)
    proc = subprocess.Popen(
        [sys.executable, "-m", "netns.reflect", "--addr", host, "--port", str(port), "--lifetime", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as a, socket.socket(fam, socket.SOCK_DGRAM) as b:
            a.bind((host, 0))
            b.bind((host, 0))
            target = format_addr((host, port))
            seen = None
            end = time.monotonic() + 10
            while seen is None and time.monotonic() < end and proc.poll() is None:
                seen = ask(a, target, timeout=0.2, tries=1)
            assert seen == format_addr(a.getsockname())
            assert ask(b, target) == format_addr(b.getsockname())  # each sender its own address
            assert receive(a, 0.1) == []  # one answer per probe
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=5)
    assert out == b"" and err == b""


def test_addresses_round_trip() -> None:
    assert parse_addr("203.0.113.1:51820") == ("203.0.113.1", 51820)
    assert parse_addr("[2001:db8::1]:3478") == ("2001:db8::1", 3478)
    assert format_addr(("2001:db8::1", 3478, 0, 0)) == "[2001:db8::1]:3478"

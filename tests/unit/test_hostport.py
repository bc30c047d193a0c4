"""spanutil.hostport: the one HOST:PORT grammar of flags, config fields and dial targets."""

from __future__ import annotations

import argparse

import pytest

from spanutil.hostport import HostPortError, split_host_port, split_listen


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:3000", ("127.0.0.1", 3000)),
        ("node-1.example:50000", ("node-1.example", 50000)),
        ("[fd00::1]:50000", ("fd00::1", 50000)),
        ("[fe80::1%eth0]:51820", ("fe80::1%eth0", 51820)),  # the zone is the caller's to keep or drop
        ("::1:80", ("::1", 80)),  # unbracketed IPv6 splits at the last colon
        ("  stun.example:3478 ", ("stun.example", 3478)),
        ("h:65535", ("h", 65535)),
    ],
)
def test_split_host_port(text: str, want: tuple[str, int]) -> None:
    assert split_host_port(text) == want


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("50000", "no port"),
        ("host:", "port '' is not a number"),
        (":3000", "no host"),
        ("[::1]", "must be followed by :PORT"),
        ("[::1]3000", "must be followed by :PORT"),
        ("h:x", "port 'x' is not a number"),
        ("h:²", "is not a number"),  # a Unicode digit int() would reject with its own message
        ("h:70000", "port 70000 out of range"),
        ("h:0", "port 0 out of range"),
    ],
)
def test_split_host_port_names_value_and_rule(text: str, why: str) -> None:
    with pytest.raises(ValueError) as e:
        split_host_port(text, what="--target")
    msg = str(e.value)
    assert msg.startswith(f"--target {text!r}: ") and why in msg
    assert "port 1-65535" in msg
    assert isinstance(e.value, HostPortError) and why in e.value.reason and text not in e.value.reason


def test_options_widen_the_grammar() -> None:
    assert split_host_port(":3000", empty_host=True) == ("", 3000)
    assert split_host_port("h:0", port_zero=True) == ("h", 0)
    with pytest.raises(ValueError, match=r"or :PORT\b.*port 0-65535"):
        split_host_port("h:99999", empty_host=True, port_zero=True)


def test_split_listen() -> None:
    assert split_listen(":50000") == (None, 50000)  # every address, IPv4 and IPv6
    assert split_listen("*:50000") == (None, 50000)
    assert split_listen("[::]:50000") == (None, 50000)
    assert split_listen("0.0.0.0:1") == ("0.0.0.0", 1)
    assert split_listen("127.0.0.1:0") == ("127.0.0.1", 0)  # 0: the kernel picks a port
    assert split_listen("[::1]:7") == ("::1", 7)
    for bad in ("50000", "host:", "h:70000", "h:x"):
        with pytest.raises(ValueError, match=r"^listen address"):
            split_listen(bad)


def test_a_flag_type_needs_no_wrapper(capsys: pytest.CaptureFixture[str]) -> None:
    """HostPortError is an ArgumentTypeError: argparse prints our message, not "invalid value"."""
    p = argparse.ArgumentParser(prog="prog")
    p.add_argument("--addr", type=split_listen)
    assert p.parse_args(["--addr", ":7"]).addr == (None, 7)
    with pytest.raises(SystemExit):
        p.parse_args(["--addr", "h:99999"])
    err = capsys.readouterr().err
    assert "argument --addr: listen address 'h:99999': port 99999 out of range" in err

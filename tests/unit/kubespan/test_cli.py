"""``kubespan run`` flags become one checked MeshConfig; a bad value is reported under its flag."""

from __future__ import annotations

import pytest

from kubespan import cli
from kubespan.constants import MeshConfig

REQUIRED = ["run", "--cluster-id", "c1", "--discovery", "http://127.0.0.1:3000", "--state-dir", "/tmp/ks"]


def test_flags_map_onto_every_mesh_field() -> None:
    ns = cli.build_parser().parse_args(
        [
            *REQUIRED,
            *("--link", "ks0", "--listen-port", "51999", "--mtu", "1380", "--keepalive", "0"),
            *("--table", "181", "--rule-priority", "32000", "--nft-table", "ks_t", "--steering", "routes"),
            *("--fwmark-wireguard", "0x100", "--fwmark-force", "0x200", "--fwmark-mask", "0x300"),
            "--allow-down-peer-bypass",
        ]
    )
    assert cli.mesh_config(ns) == MeshConfig(
        link_name="ks0",
        listen_port=51999,
        mtu=1380,
        persistent_keepalive=0,
        routing_table=181,
        rule_priority=32000,
        fwmark_wireguard=0x100,
        fwmark_force=0x200,
        fwmark_mask=0x300,
        nft_table="ks_t",
        steering="routes",
        allow_down_peer_bypass=True,
    )
    assert cli.mesh_config(cli.build_parser().parse_args(REQUIRED)) == MeshConfig()


def test_bad_values_are_named_by_flag_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*REQUIRED, "--listen-port", "0", "--mtu", "70000", "--link", "a/b"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--listen-port: 0 is below the minimum 1: must be between 1 and 65535" in err
    assert "--mtu: 70000 is above the maximum 65455" in err
    assert "--link: 'a/b' must be 1..15 characters" in err


def test_stun_servers_are_repeatable_host_port_pairs(capsys: pytest.CaptureFixture[str]) -> None:
    ns = cli.build_parser().parse_args(
        [*REQUIRED, "--stun-server", "stun.example.net:3478", "--stun-server", "[2001:db8::1]:3479"]
    )
    assert ns.stun_server == [("stun.example.net", 3478), ("2001:db8::1", 3479)]
    assert cli.build_parser().parse_args(REQUIRED).stun_server == []
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([*REQUIRED, "--stun-server", "stun.example.net"])
    assert exit_info.value.code == 2
    assert "STUN server 'stun.example.net': no port (expected HOST:PORT or [IPv6]:PORT, port 1-65535)" in (
        capsys.readouterr().err
    )


def test_status_table_shows_the_nat_line_and_each_peers_class() -> None:
    st = {
        "nodename": "n1",
        "mesh_address": "fd00::1",
        "listen_port": 51820,
        "backend": "userspace",
        "ready": True,
        "nat": {
            "nat_class": "eim",
            "mapped": "198.51.100.7:40000",
            "published": "198.51.100.7:40000",
            "responders": ["192.0.2.1:3478", "192.0.2.2:3478"],
            "error": None,
        },
        "peers": [
            {
                "label": "n2",
                "endpoint": "192.0.2.9:51820",
                "state": "up",
                "rx_bytes": 0,
                "tx_bytes": 0,
                "last_handshake": None,
                "nat_class": "edm",
            }
        ],
    }
    lines = cli.format_table(st, now=0).splitlines()
    assert lines[0] == "node n1 mesh fd00::1 port 51820 backend userspace steering marks ready true"
    assert lines[1] == "nat eim mapped 198.51.100.7:40000 (published) via 2 responders"
    assert lines[2].split()[-1] == "NAT" and lines[3].split()[-1] == "edm"
    st["nat"] = {"nat_class": "unknown", "error": "STUN: no responder configured"}
    st["steering"] = "routes"
    lines = cli.format_table(st, now=0).splitlines()
    assert lines[1] == "nat unknown (STUN: no responder configured)" and " steering routes " in lines[0]


def test_status_table_shows_each_peers_path() -> None:
    peer = {"label": "n2", "endpoint": "203.0.113.9:40100", "state": "up", "rx_bytes": 0, "tx_bytes": 0}
    st: dict[str, object] = {"nodename": "n1", "nat": {}, "peers": [peer]}
    peer |= {
        "last_handshake": None,
        "path": "relay",
        "relay_via": "r",
        "why_not_direct": "both behind symmetric NAT",
    }
    lines = cli.format_table(st, now=0).splitlines()
    assert "PATH" in lines[2].split()
    assert "relay via r (both behind symmetric NAT)" in lines[3]
    peer |= {"path": "direct", "relay_via": None, "why_not_direct": None}
    assert "  direct  " in cli.format_table(st, now=0).splitlines()[3]


def test_status_table_shows_the_round_trip_or_a_dash_never_zero() -> None:
    peer = {"label": "n2", "endpoint": "203.0.113.9:40100", "state": "up", "rx_bytes": 0, "tx_bytes": 0}
    peer |= {"last_handshake": None, "path": "direct", "rtt": 0.0123}
    st: dict[str, object] = {"nodename": "n1", "nat": {}, "peers": [peer]}
    lines = cli.format_table(st, now=0).splitlines()
    assert "RTT" in lines[2].split() and "  12.3 ms  " in lines[3]
    peer["rtt"] = None  # no probe answered yet
    row = cli.format_table(st, now=0).splitlines()[3]
    assert row.split()[-2:] == ["-", "unknown"] and "ms" not in row


def test_status_table_shows_the_relay_line_on_a_relay_node() -> None:
    st: dict[str, object] = {"nodename": "r", "nat": {}, "peers": []}
    assert not any(line.startswith("relay") for line in cli.format_table(st, now=0).splitlines())
    st["relay"] = {
        "running": True,
        "allocations": 2,
        "forwarded_packets": 1532,
        "forwarded_bytes": 3 << 20,
        "dropped": {"not_wireguard": 7, "forged_mac1": 3},
    }
    lines = cli.format_table(st, now=0).splitlines()
    assert (
        lines[2]
        == "relay 2 allocations, 1532 packets (3.0 MiB) forwarded, dropped forged_mac1=3 not_wireguard=7"
    )

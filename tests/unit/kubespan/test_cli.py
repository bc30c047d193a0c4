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
            *("--table", "181", "--rule-priority", "32000", "--nft-table", "ks_t"),
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

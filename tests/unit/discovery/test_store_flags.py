"""discovery-service's store flags (issue 15): --store etcd needs endpoints, etcd flags need --store etcd,
TLS files need https endpoints; every bad combination exits 2 with a message naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from discovery.server.main import build_parser, parse_args


def test_defaults_are_the_embedded_store() -> None:
    ns = parse_args([])
    assert ns.store == "embedded" and ns.etcd_endpoint == [] and ns.etcd_prefix == "/discovery/"
    assert ns.etcd_lease_bucket == 60


def test_etcd_store_with_endpoints_and_tls(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    ns = parse_args(
        [
            "--store=etcd",
            "--etcd-endpoint=https://10.0.0.1:2379",
            "--etcd-endpoint",
            "https://10.0.0.2:2379",
            f"--etcd-ca={tmp_path / 'ca.pem'}",
            f"--etcd-cert={tmp_path / 'cert.pem'}",
            f"--etcd-key={tmp_path / 'key.pem'}",
            "--etcd-prefix=/reg-a/",
            "--etcd-lease-bucket=2m",
        ]
    )
    assert ns.etcd_endpoint == ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
    assert ns.etcd_prefix == "/reg-a/" and ns.etcd_lease_bucket == 120


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--store=etcd"], "needs at least one --etcd-endpoint"),
        (["--etcd-endpoint=http://e:2379"], "without --store etcd"),
        (["--store=redis"], "invalid choice"),
        (["--store=etcd", "--etcd-endpoint=ftp://e:2379"], "--etcd-endpoint"),
        (["--store=etcd", "--etcd-endpoint=https://e:2379", "--etcd-cert=/etc/hostname"], "together"),
        (["--store=etcd", "--etcd-endpoint=http://e:2379", "--etcd-ca=/etc/hostname"], "https://"),
        (["--store=etcd", "--etcd-endpoint=https://e:2379", "--etcd-ca=/nonexistent/ca"], "cannot read"),
        (["--store=etcd", "--etcd-endpoint=http://e:2379", "--etcd-prefix="], "--etcd-prefix"),
        (["--store=etcd", "--etcd-endpoint=http://e:2379", "--etcd-lease-bucket=100ms"], "at least 1s"),
        (["--import-snapshot=/var/discovery-service/state.binpb"], "without --store etcd"),
        (["--store=etcd", "--etcd-endpoint=http://e:2379", "--import-only"], "--import-only needs"),
    ],
)
def test_bad_combinations_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        parse_args(argv)
    assert ei.value.code == 2
    assert needle in capsys.readouterr().err


def test_help_names_the_store_flags() -> None:
    text = build_parser().format_help()
    for flag in ("--store", "--etcd-endpoint", "--etcd-ca", "--etcd-cert", "--etcd-key", "--etcd-prefix"):
        assert flag in text

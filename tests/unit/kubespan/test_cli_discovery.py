"""``kubespan run --discovery``: host lists of registry replicas are accepted; bad entries are named."""

from __future__ import annotations

import pytest

from kubespan import cli


def _run(*discovery: str) -> list[str]:
    args = ["run", "--cluster-id", "c1", "--state-dir", "/tmp/ks"]
    for d in discovery:
        args += ["--discovery", d]
    return args


def test_host_list_is_accepted() -> None:
    urls = ["https://10.0.0.1:3000,10.0.0.2:3000,[fd00::3]:3000", "http://reg.example:3000"]
    ns = cli.build_parser().parse_args(_run(*urls))
    cli.check_discovery_urls(ns.discovery)
    assert ns.discovery == urls


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://10.0.0.1:3000,,10.0.0.2:3000", "replica 2 is empty"),
        ("https://10.0.0.1:3000,http://10.0.0.2:3000", "replica 2 ('http://10.0.0.2:3000')"),
    ],
)
def test_bad_host_list_is_a_usage_error(url: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(_run(url))
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_duplicate_endpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="given twice"):
        cli.check_discovery_urls(["http://a:1", "http://a:1"])


def test_help_says_how_to_give_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "host list" in out and "A/AAAA" in out

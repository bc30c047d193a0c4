"""Machine config discovery endpoints may list replicas of one registry (issue 15)."""

from __future__ import annotations

import pytest

from machined.config import ConfigValidationError, MachineConfig
from machined.config.documents import check_discovery_url
from machined.config.testing import config_yaml
from machined.config.yamlio import load_documents

LIST = "https://10.0.0.1:3000,10.0.0.2:3000,[fd00::3]:3000"


def _load(*urls: str) -> MachineConfig:
    return MachineConfig.from_documents(load_documents(config_yaml(discovery=urls)))


def test_host_list_is_one_endpoint() -> None:
    cfg = _load(LIST, "http://other.example:3000")
    assert cfg.mesh().discovery_urls == (LIST, "http://other.example:3000")


@pytest.mark.parametrize(
    "url",
    [LIST, "https://reg.example,reg2.example:8443/", "10.0.0.1:3000,10.0.0.2:3000", "https://d.example/"],
)
def test_good_urls(url: str) -> None:
    assert check_discovery_url(url) is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://10.0.0.1:3000,,10.0.0.2:3000", "replica 2 is not valid"),
        ("https://10.0.0.1:3000,http://10.0.0.2:3000", "replica 2 is not valid"),
        ("https://a.example:0,b.example", "replica 1 is not valid"),
        ("https://a.example,b.example/path?token=s3cret", "replica 2 is not valid"),
    ],
)
def test_bad_entry_is_named_by_position(url: str, says: str) -> None:
    rule = check_discovery_url(url)
    assert rule is not None and says in rule and "host list" in rule
    assert "s3cret" not in rule


def test_bad_host_list_fails_the_config() -> None:
    with pytest.raises(ConfigValidationError) as e:
        _load("https://10.0.0.1:3000,,10.0.0.2:3000")
    (p,) = e.value.problems
    assert p.location == "DiscoveryServiceConfig[ds0].endpoint" and "replica 2" in p.rule


def test_credentials_in_a_host_list_are_not_echoed() -> None:
    assert check_discovery_url("https://a.example,admin:pa55w0rd@b.example") == "must not contain credentials"


def test_spanctl_gen_config_takes_a_host_list() -> None:
    from machined import gen

    g = gen.gen_config("demo", "https://10.0.0.1:6443", gen.gen_secrets(), discovery=[LIST])
    for text in (g.controlplane, g.worker):
        m = MachineConfig.parse(text)
        assert [e.url for e in m.discovery_endpoints] == [LIST]
        assert LIST in m.mesh().discovery_urls


def test_spanctl_gen_config_refuses_a_bad_host_list() -> None:
    from machined import gen

    with pytest.raises(ConfigValidationError, match="replica 2"):
        gen.gen_config(
            "demo",
            "https://10.0.0.1:6443",
            gen.gen_secrets(),
            discovery=["https://10.0.0.1:3000,,10.0.0.2:3000"],
        )

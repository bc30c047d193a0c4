"""One link-name rule for the config, both WireGuard backends and the link manager."""

from __future__ import annotations

import pytest

from kubespan.constants import ConfigError, MeshConfig, check_link_name
from kubespan.dataplane.links import LinkManager
from kubespan.wireguard.kernel import KernelBackend
from kubespan.wireguard.userspace import UserspaceBackend

BAD = ["", "x" * 16, "ksé", "a/b", "a b", "a\tb", "a:b", ".", "..", "ks\x00", "ks\x7f"]
GOOD = ["kubespan", "x" * 15, "ks-1.2_x", "wg@0", "KS+1"]


def consumers():
    return {
        "config": lambda name: MeshConfig(link_name=name),
        "kernel backend": lambda name: KernelBackend(name),
        "userspace backend": lambda name: UserspaceBackend(name),
        "link manager": lambda name: LinkManager(name),
    }


@pytest.mark.parametrize("name", BAD)
def test_every_consumer_rejects_the_same_names(name: str) -> None:
    with pytest.raises(ConfigError):
        check_link_name(name)
    for what, make in consumers().items():
        with pytest.raises(ValueError, match=r"^(ifname|link_name): "):
            make(name)
            pytest.fail(f"{what} accepted {name!r}")


@pytest.mark.parametrize("name", GOOD)
def test_every_consumer_accepts_the_same_names(name: str) -> None:
    check_link_name(name)
    for make in consumers().values():
        make(name)


def test_the_message_names_the_field_and_the_rule() -> None:
    with pytest.raises(ConfigError) as e:
        MeshConfig(link_name="ksé")
    assert e.value.field == "link_name"
    assert "1..15" in str(e.value) and "ASCII" in str(e.value)

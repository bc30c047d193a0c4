"""MeshConfig defaults match Talos and validation names the field and the limit."""

from __future__ import annotations

import dataclasses

import pytest

from kubespan import constants as c
from kubespan.constants import ConfigError, DetectionTimings, MeshConfig


def test_defaults_are_talos():
    cfg = MeshConfig()
    assert cfg.link_name == "kubespan"
    assert cfg.listen_port == 51820
    assert cfg.mtu == 1420
    assert cfg.persistent_keepalive == 25
    assert cfg.routing_table == 180
    assert cfg.rule_priority == 32500
    assert (cfg.fwmark_wireguard, cfg.fwmark_force, cfg.fwmark_mask) == (0x20, 0x40, 0x60)
    assert cfg.allow_down_peer_bypass is False  # fail closed, like Talos' default
    assert c.MTU_MIN == 1280


def test_talos_peer_down_interval_is_275():
    assert c.TALOS_PEER_DOWN_INTERVAL == 275


def test_mss_values_follow_talos_arithmetic():
    cfg = MeshConfig()
    assert cfg.mss_ipv4 == 1368
    assert cfg.mss_ipv6 == 1348
    assert MeshConfig(mtu=1280).mss_ipv4 == 1228


def test_fwmark_clear_mask():
    assert MeshConfig().fwmark_clear == 0xFFFFFF9F
    assert MeshConfig(fwmark_mask=0x6000, fwmark_wireguard=0x2000, fwmark_force=0x4000).fwmark_clear == (
        0xFFFF9FFF
    )


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"mtu": 1279}, "mtu", "minimum 1280"),
        ({"mtu": 65536}, "mtu", f"maximum {c.MTU_MAX}"),
        ({"listen_port": 0}, "listen_port", "minimum 1"),
        ({"listen_port": 70000}, "listen_port", "maximum 65535"),
        ({"persistent_keepalive": -1}, "persistent_keepalive", "minimum 0"),
        ({"persistent_keepalive": 65536}, "persistent_keepalive", "maximum 65535"),
        ({"routing_table": 254}, "routing_table", "reserved"),
        ({"routing_table": 0}, "routing_table", "minimum 1"),
        ({"rule_priority": 0}, "rule_priority", "minimum 1"),
        ({"rule_priority": 32766}, "rule_priority", "maximum 32765"),
        ({"fwmark_force": 0x80}, "fwmark_force", "outside fwmark_mask 0x60"),
        ({"fwmark_wireguard": 0x40}, "fwmark_force", "must differ"),
        ({"fwmark_mask": 0}, "fwmark_mask", "minimum 1"),
        ({"link_name": ""}, "link_name", "1..15"),
        ({"link_name": "a" * 16}, "link_name", "1..15"),
        ({"link_name": "kube span"}, "link_name", "whitespace"),
        ({"link_name": "a/b"}, "link_name", "'/'"),
        ({"nft_table": "1abc"}, "nft_table", "[A-Za-z0-9_]"),
        ({"nft_table": "a-b"}, "nft_table", "[A-Za-z0-9_]"),
        ({"mtu": 1420.0}, "mtu", "integer"),
        ({"listen_port": True}, "listen_port", "integer"),
        ({"reconcile_interval": 0}, "reconcile_interval", "greater than 0"),
    ],
)
def test_validation_names_field_and_limit(kwargs, field, fragment):
    with pytest.raises(ConfigError) as info:
        MeshConfig(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert fragment in str(info.value)


def test_boundaries_are_accepted():
    MeshConfig(mtu=c.MTU_MIN)
    MeshConfig(mtu=c.MTU_MAX)
    MeshConfig(listen_port=1, persistent_keepalive=0, rule_priority=32765, routing_table=2**32 - 1)
    MeshConfig(link_name="a" * 15, nft_table="_x9")


def test_config_is_frozen():
    cfg = MeshConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mtu = 1300  # type: ignore[misc]


def test_timings_defaults_document_wireguard_reasoning():
    t = DetectionTimings()
    # two passive keepalives plus slack
    assert t.passive_dead_after == 23.0
    # one rate-limited initiation plus one retry (with jitter) plus a poll
    assert t.trial_timeout == pytest.approx(12.1667, abs=1e-3)
    assert t.session_dead_after == 215.0
    # fast detection: the dead window holds the minimum probe count at the probe spacing, and
    # a stall shows within two active polls
    assert t.probe_after + (t.dead_min_probes - 1) * t.probe_interval < t.dead_after
    assert 2 * t.active_poll_interval + t.dead_after <= 1.5
    # detection is well below Talos' 275 s in every path
    assert max(t.dead_after, t.passive_dead_after, t.session_dead_after) < c.TALOS_PEER_DOWN_INTERVAL


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dead_after": 0}, "dead_after"),
        ({"probe_interval": -1.0}, "probe_interval"),
        ({"probe_after": -0.1}, "probe_after"),
        ({"active_poll_interval": 0}, "active_poll_interval"),
        ({"slow_probe_interval": 0}, "slow_probe_interval"),
        ({"dead_min_probes": 0}, "dead_min_probes"),
        ({"learned_max": -1}, "learned_max"),
        ({"dead_after": 30.0}, "dead_after"),
        ({"trial_timeout": 100.0}, "trial_timeout"),
        ({"session_dead_after": 180.0}, "session_dead_after"),
    ],
)
def test_timings_validation(kwargs, field):
    with pytest.raises(ConfigError) as info:
        DetectionTimings(**kwargs)
    assert info.value.field == field


def test_as_dict_is_plain_and_complete():
    d = MeshConfig().as_dict()
    assert d["mtu"] == 1420
    assert isinstance(d["timings"], dict)
    assert d["timings"]["dead_after"] == 1.0
    assert set(d) == {f.name for f in dataclasses.fields(MeshConfig)}


def test_one_check_lists_every_problem_first_one_raised():
    with pytest.raises(ConfigError) as info:
        MeshConfig(listen_port=0, mtu=70000, fwmark_mask="x", fwmark_force=0x80, nft_table=5)
    err = info.value
    assert err.field == "listen_port" and err.rule == "0 is below the minimum 1: must be between 1 and 65535"
    assert [e.field for e in err.errors] == ["listen_port", "mtu", "fwmark_mask", "nft_table"]
    assert err.errors[0] is err
    # a check that spans fields (bits outside the mask) waits until the mask itself is valid
    assert "fwmark_force" not in {e.field for e in err.errors}

"""AgentConfig ``mesh.punchRetryInitial`` / ``mesh.punchRetryMax``: durations in the project grammar that
reach the engine's ``PunchTimings`` (defaults 60 s and 10 min), with errors naming the field (issue 14)."""

from __future__ import annotations

import pytest

from machined.config import ConfigValidationError, MachineConfig
from machined.config.testing import config_yaml, new_secret

SECRET = new_secret()


def _mesh(mesh: dict[str, object]) -> MachineConfig:
    return MachineConfig.parse(config_yaml(secret=SECRET, agent={"stateDir": "/var/lib/m", "mesh": mesh}))


def test_defaults_are_the_engine_defaults() -> None:
    t = _mesh({}).mesh().options("h").punch_timings
    assert t is not None and (t.retry_initial, t.retry_max) == (60.0, 600.0)


def test_durations_reach_the_engine() -> None:
    cfg = _mesh({"punchRetryInitial": "5s", "punchRetryMax": "1m30s"})
    assert (cfg.agent.punch_retry_initial, cfg.agent.punch_retry_max) == (5.0, 90.0)
    t = cfg.mesh().options("h").punch_timings
    assert t is not None and (t.retry_initial, t.retry_max) == (5.0, 90.0)
    assert _mesh({"punchRetryInitial": 30}).mesh().options("h").punch_timings.retry_initial == 30.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mesh", "location", "rule"),
    [
        ({"punchRetryInitial": "soon"}, "AgentConfig.mesh.punchRetryInitial", "must be a duration"),
        ({"punchRetryInitial": "0s"}, "AgentConfig.mesh.punchRetryInitial", "must be greater than 0"),
        ({"punchRetryMax": "-1m"}, "AgentConfig.mesh.punchRetryMax", "must be a duration"),
        (
            {"punchRetryInitial": "2m", "punchRetryMax": "1m"},
            "AgentConfig.mesh.punchRetryMax",
            "must be at least mesh.punchRetryInitial (120s), got 60s",
        ),
    ],
)
def test_bad_values_name_the_field(mesh: dict[str, object], location: str, rule: str) -> None:
    with pytest.raises(ConfigValidationError) as e:
        _mesh(mesh)
    matching = [p for p in e.value.problems if p.location == location]
    assert matching, str(e.value)
    assert any(rule in p.rule for p in matching), str(e.value)

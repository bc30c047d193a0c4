"""Service definitions: validation names the field and the rule; back-off; mesh requirements."""

from __future__ import annotations

import pytest

from machined.services import (
    Backoff,
    HealthCheck,
    HealthKind,
    MeshMode,
    MeshRequirement,
    OnMeshDegraded,
    RestartPolicy,
    Service,
    ServiceConfigError,
)


def test_defaults_follow_talos():
    s = Service("web", ("web", "--port", "80"))
    assert s.restart is RestartPolicy.ALWAYS
    assert s.stop_timeout == 10.0
    assert s.requires_mesh == MeshRequirement()
    assert s.on_mesh_degraded is OnMeshDegraded.IGNORE
    h = HealthCheck.tcp("127.0.0.1", 80)
    assert (h.initial_delay, h.interval, h.timeout) == (1.0, 5.0, 0.5)


def test_backoff_doubles_up_to_the_cap():
    b = Backoff(initial=1, factor=2, max=10)
    assert [b.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert b.delay(10_000) == 10  # no overflow on long streaks
    assert Backoff(initial=0.5, factor=1, max=5).delay(50) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "field", "needle"),
    [
        ({"name": "Web"}, "services[Web].name", "a-z"),
        ({"argv": ()}, "services[web].argv", "non-empty"),
        ({"argv": "sleep 1"}, "services[web].argv", "not a single string"),
        ({"restart": "sometimes"}, "services[web].restart", "always, on-failure or never"),
        ({"stop_timeout": 0}, "services[web].stop_timeout", "> 0"),
        ({"depends_on": ("web",)}, "services[web].depends_on", "itself"),
        ({"depends_on": ("a", "a")}, "services[web].depends_on", "twice"),
        ({"requires_mesh": "quorum 0"}, "services[web].requires_mesh.quorum", ">= 1"),
        ({"requires_mesh": "most"}, "services[web].requires_mesh.mode", "none, ready or quorum"),
        ({"on_mesh_degraded": "panic"}, "services[web].on_mesh_degraded", "ignore, stop or restart"),
        ({"env": {"A=B": "c"}}, "services[web].env", "no '='"),
        ({"log_lines": 0}, "services[web].log_lines", "1..1000000"),
    ],
)
def test_invalid_fields_are_named(kwargs, field, needle):
    base = {"name": "web", "argv": ("web",)} | kwargs
    with pytest.raises(ServiceConfigError) as ei:
        Service(**base)
    assert ei.value.field == field
    assert needle in str(ei.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "tcp", "port": 0}, "port"),
        ({"kind": "tcp", "port": 70000}, "port"),
        ({"kind": "exec"}, "argv"),
        ({"kind": "http", "url": "ftp://x"}, "url"),
        ({"kind": "http", "url": "http://x", "interval": 0}, "interval"),
        ({"kind": "http", "url": "http://x", "timeout": -1}, "timeout"),
        ({"kind": "ping"}, "kind"),
    ],
)
def test_invalid_health_checks(kwargs, field):
    with pytest.raises(ServiceConfigError) as ei:
        HealthCheck(**kwargs)
    assert ei.value.field == field


def test_mesh_requirement_forms():
    assert MeshRequirement.parse("ready").mode is MeshMode.READY
    assert MeshRequirement.parse(None) == MeshRequirement()
    for form in ("quorum 2", "quorum=2", "quorum: 2", {"quorum": 2}, {"mode": "quorum", "quorum": 2}):
        assert MeshRequirement.parse(form) == MeshRequirement(MeshMode.QUORUM, 2), form
    assert str(MeshRequirement(MeshMode.QUORUM, 3)) == "quorum 3"
    with pytest.raises(ServiceConfigError):
        MeshRequirement(MeshMode.READY, 2)


def test_from_dict_builds_nested_values_and_rejects_unknown_keys():
    s = Service.from_dict(
        {
            "name": "etcd",
            "argv": ["etcd", "--name", "n1"],
            "env": {"ETCD_X": "1"},
            "restart": "on-failure",
            "backoff": {"initial": 0.5, "max": 8},
            "health": {"kind": "http", "url": "http://127.0.0.1:2379/health", "interval": 2},
            "depends_on": ["kubespan-ready"],
            "requires_mesh": "quorum 1",
            "on_mesh_degraded": "restart",
        }
    )
    assert s.argv == ("etcd", "--name", "n1")
    assert s.backoff == Backoff(initial=0.5, max=8)
    assert s.health is not None and s.health.kind is HealthKind.HTTP and s.health.interval == 2
    assert s.requires_mesh == MeshRequirement(MeshMode.QUORUM, 1)
    assert s.on_mesh_degraded is OnMeshDegraded.RESTART
    with pytest.raises(ServiceConfigError) as ei:
        Service.from_dict({"name": "etcd", "argv": ["etcd"], "restart_policy": "always"})
    assert ei.value.field == "services[etcd].restart_policy"
    with pytest.raises(ServiceConfigError) as ei:
        Service.from_dict({"name": "etcd", "argv": ["etcd"], "health": {"kind": "tcp", "port": 0}})
    assert ei.value.field == "services[etcd].health.port"
    with pytest.raises(ServiceConfigError) as ei:
        Service.from_dict({"name": "etcd"})
    assert ei.value.field == "services[etcd].argv"

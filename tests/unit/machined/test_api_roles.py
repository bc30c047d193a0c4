"""Roles: the one parser (one role per value, never split), the metadata encoding, the rule table."""

from __future__ import annotations

import pytest

from machined.api.roles import (
    ADMIN,
    KNOWN_ROLES,
    MAX_ROLE_LEN,
    RULES,
    allowed,
    parse_roles,
    role_metadata,
    roles_from_metadata,
)
from spanapi.talos.machine import machine_pb2


def test_no_metadata_means_a_local_admin_and_metadata_replaces_it():
    assert roles_from_metadata(None) == {ADMIN}
    assert roles_from_metadata([("authority", "x")]) == {ADMIN}
    assert roles_from_metadata([("talos-role", "os:reader")]) == {"os:reader"}
    # several values: several roles; unknown ones are kept (they grant nothing); bytes are decoded
    assert roles_from_metadata(
        [("talos-role", "os:reader"), ("talos-role", " os:operator "), ("talos-role", b"os:future")]
    ) == {"os:reader", "os:operator", "os:future"}


@pytest.mark.parametrize(
    "value",
    [
        "x,os:admin",  # the O= value: one role that is no role, never split into os:admin
        "os:admin,os:reader",
        "os:reader, os:admin",
        "os:admin os:reader",
        "os:admin\n",  # stripped: this one *is* os:admin (Talos trims), see below
        "os:ad\x00min",
        "os:admin\u200b",
        "é",
        "a" * (MAX_ROLE_LEN + 1),
        "",
        " , ",
    ],
)
def test_one_value_is_one_role_and_a_value_that_is_no_role_grants_nothing(value):
    got = parse_roles([value])
    if value.strip() == ADMIN:
        assert got == {ADMIN}
        return
    assert got == frozenset(), value
    # present but naming no valid role: no roles, *not* the header-less local admin
    assert roles_from_metadata([("talos-role", value)]) == frozenset()
    assert not any(allowed(m, roles_from_metadata([("talos-role", value)])) for m in RULES)


def test_role_metadata_is_one_value_per_role_and_round_trips():
    roles = frozenset({"os:reader", "os:operator", "os:future"})
    md = role_metadata(roles)
    assert md == [("talos-role", "os:future"), ("talos-role", "os:operator"), ("talos-role", "os:reader")]
    assert roles_from_metadata(md) == roles
    for r in KNOWN_ROLES:
        assert roles_from_metadata(role_metadata({r})) == {r}
    with pytest.raises(ValueError, match="not a role"):
        role_metadata({"x,os:admin"})
    with pytest.raises(ValueError, match="os:admin"):
        role_metadata(frozenset())  # an absent header would make the caller a local admin


def test_rules_cover_every_rpc_and_unlisted_methods_need_admin():
    methods = {
        f"/machine.MachineService/{m.name}"
        for m in machine_pb2.DESCRIPTOR.services_by_name["MachineService"].methods
    }
    assert methods <= set(RULES)
    reader, operator = frozenset({"os:reader"}), frozenset({"os:operator"})
    assert allowed("/machine.MachineService/Version", reader)
    assert not allowed("/machine.MachineService/ServiceStart", reader)
    assert allowed("/machine.MachineService/ServiceStart", operator)
    assert allowed("/machine.MachineService/Reboot", operator)
    assert not allowed("/machine.MachineService/Reset", operator)
    assert not allowed("/machine.MachineService/ApplyConfiguration", operator)
    assert not allowed("/machine.MachineService/SomethingNew", operator)
    assert allowed("/machine.MachineService/SomethingNew", frozenset({ADMIN}))
    assert not allowed("/cosi.resource.State/Get", frozenset({"os:unknown"}))
    # Talos: os:etcd:backup exists to take etcd snapshots, and may do nothing else
    backup = frozenset({"os:etcd:backup"})
    assert allowed("/machine.MachineService/EtcdSnapshot", backup)
    assert [m for m in RULES if allowed(m, backup)] == ["/machine.MachineService/EtcdSnapshot"]

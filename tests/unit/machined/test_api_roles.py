"""Roles from metadata and Talos's rule table."""

from __future__ import annotations

from machined.api.roles import ADMIN, RULES, allowed, parse_roles, roles_from_metadata
from spanapi.talos.machine import machine_pb2


def test_no_metadata_means_a_local_admin_and_metadata_replaces_it():
    assert roles_from_metadata(None) == {ADMIN}
    assert roles_from_metadata([("authority", "x")]) == {ADMIN}
    assert roles_from_metadata([("talos-role", "os:reader")]) == {"os:reader"}
    assert roles_from_metadata([("talos-role", "os:reader,os:operator"), ("talos-role", b"os:future")]) == {
        "os:reader",
        "os:operator",
        "os:future",
    }
    assert parse_roles([" , "]) == frozenset()


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

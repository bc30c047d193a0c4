"""apid and machined share one rule table (machined.api.roles); apid adds only impersonation."""

import pytest

import machined.api
import machined.api.roles
import machined.apid
from machined.apid.rules import effective_roles

RULES, allowed, required_roles = (
    machined.api.roles.RULES,
    machined.api.roles.allowed,
    machined.api.roles.required_roles,
)

A, O, R, I = "os:admin", "os:operator", "os:reader", "os:impersonator"  # noqa: E741


@pytest.mark.parametrize(
    "method, roles",
    [
        ("/machine.MachineService/Version", {A, O, R}),
        ("/machine.MachineService/Hostname", {A, O, R}),
        ("/machine.MachineService/ServiceList", {A, O, R}),
        ("/machine.MachineService/Logs", {A, O, R}),
        ("/machine.MachineService/Events", {A, O, R}),
        ("/machine.MachineService/Dmesg", {A, O, R}),
        ("/machine.MachineService/Memory", {A, O, R}),
        ("/machine.MachineService/ServiceRestart", {A, O}),
        ("/machine.MachineService/ServiceStart", {A, O}),
        ("/machine.MachineService/ServiceStop", {A, O}),
        ("/machine.MachineService/Reboot", {A, O}),
        ("/machine.MachineService/Shutdown", {A, O}),
        ("/machine.MachineService/PacketCapture", {A, O}),
        ("/machine.MachineService/ApplyConfiguration", {A}),
        ("/machine.MachineService/GenerateClientConfiguration", {A}),
        ("/machine.MachineService/Read", {A}),
        ("/machine.MachineService/MetaWrite", {A, "os:meta:writer"}),
        ("/machine.MachineService/EtcdSnapshot", {A, O, "os:etcd:backup"}),
        ("/cosi.resource.State/Get", {A, O, R}),
        ("/cosi.resource.State/List", {A, O, R}),
        ("/cosi.resource.State/Watch", {A, O, R}),
        ("/cosi.resource.State/Create", {A}),
        ("/cosi.resource.State/Destroy", {A}),
        ("/time.TimeService/Time", {A, O, R}),
        ("/machine.MachineService/SomethingNew", {A}),  # unlisted: admin only
        ("/other.Service/X", {A}),
    ],
)
def test_rule_table(method, roles):
    assert required_roles(method) == roles
    for role in (A, O, R, I, "os:etcd:backup", "os:meta:writer", "x:unknown", "x,os:admin"):
        assert allowed(method, {role}) == (role in roles)


def test_one_table_for_apid_and_machined():
    assert machined.apid.RULES is machined.api.RULES is RULES
    assert machined.apid.allowed is machined.api.allowed is allowed
    assert machined.apid.required_roles is required_roles


def test_impersonator_roles_from_metadata_others_ignored():
    md = (("talos-role", "os:reader"), ("talos-role", "os:operator"), ("talos-role", "os:x"), ("other", "v"))
    assert effective_roles(frozenset({I}), md) == {R, O, "os:x"}
    assert effective_roles(frozenset({I}), ()) == {I}  # no header: the certificate's roles
    assert effective_roles(frozenset({R}), (("talos-role", "os:admin"),)) == {R}  # no escalation
    assert effective_roles(frozenset({A, R}), None) == {A, R}
    assert not allowed("/machine.MachineService/Version", effective_roles(frozenset({I}), ()))
    # one role per value here too: a comma-joined value is no role at all, and grants nothing
    assert effective_roles(frozenset({I}), (("talos-role", "x,os:admin"),)) == frozenset()
    assert effective_roles(frozenset({I}), (("talos-role", "os:reader,os:admin"),)) == frozenset()

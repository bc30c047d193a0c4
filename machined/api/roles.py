"""Who may call what: Talos's roles and its per-method rule table.

**Roles arrive as gRPC metadata ``talos-role``** — the header Talos's apid sets before it calls
machined. Each metadata value may hold one role or several separated by commas; several values are
merged. apid (and anything else that proxies to machined) MUST set it from the authenticated
client's certificate and MUST strip it from what clients send.

**A caller without that header is treated as ``os:admin``**: the unix socket's owner, group and mode
(0660 by default) are what admits a local process at all, exactly as filesystem permissions gate
``/run/machined/machine.sock`` on Talos. Never expose the socket to less trusted users.

Rules (from Talos's ``machined.go``; a method not listed needs ``os:admin``): a call is allowed when
the caller's roles intersect the method's set. Unknown role strings are kept (forward compatible) but
grant nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

ROLE_METADATA = "talos-role"

ADMIN = "os:admin"
OPERATOR = "os:operator"
READER = "os:reader"
ETCD_BACKUP = "os:etcd:backup"
IMAGE_VERIFIER = "os:image:verifier"
META_WRITER = "os:meta:writer"
IMPERSONATOR = "os:impersonator"
KNOWN_ROLES = frozenset({ADMIN, OPERATOR, READER, ETCD_BACKUP, IMAGE_VERIFIER, META_WRITER, IMPERSONATOR})

A = frozenset({ADMIN})
AO = frozenset({ADMIN, OPERATOR})
AOR = frozenset({ADMIN, OPERATOR, READER})

RULES: dict[str, frozenset[str]] = {
    "/machine.MachineService/ApplyConfiguration": A,
    "/machine.MachineService/Dmesg": AOR,
    "/machine.MachineService/Events": AOR,
    "/machine.MachineService/GenerateClientConfiguration": A,
    "/machine.MachineService/Hostname": AOR,
    "/machine.MachineService/LoadAvg": AOR,
    "/machine.MachineService/Logs": AOR,
    "/machine.MachineService/Memory": AOR,
    "/machine.MachineService/NetworkDeviceStats": AOR,
    "/machine.MachineService/Netstat": AOR,
    "/machine.MachineService/Reboot": AO,
    "/machine.MachineService/Reset": A,
    "/machine.MachineService/ServiceList": AOR,
    "/machine.MachineService/ServiceRestart": AO,
    "/machine.MachineService/ServiceStart": AO,
    "/machine.MachineService/ServiceStop": AO,
    "/machine.MachineService/Shutdown": AO,
    "/machine.MachineService/Upgrade": A,
    "/machine.MachineService/Version": AOR,
    "/cosi.resource.State/Get": AOR,
    "/cosi.resource.State/List": AOR,
    "/cosi.resource.State/Watch": AOR,
    "/cosi.resource.State/Create": A,
    "/cosi.resource.State/Update": A,
    "/cosi.resource.State/Destroy": A,
    "/cosi.resource.State/Teardown": A,
    "/cosi.resource.State/TeardownAndDestroy": A,
}


def parse_roles(values: Iterable[str]) -> frozenset[str]:
    """Roles from ``talos-role`` metadata values (each may be a comma-separated list)."""
    return frozenset(r.strip() for v in values for r in v.split(",") if r.strip())


def roles_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> frozenset[str]:
    """The caller's roles: from ``talos-role``, or ``{os:admin}`` when the header is absent."""
    values = [v.decode() if isinstance(v, bytes) else v for k, v in (metadata or ()) if k == ROLE_METADATA]
    if not values:
        return A
    return parse_roles(values)


def allowed(method: str, roles: frozenset[str]) -> bool:
    return bool(RULES.get(method, A) & roles)


def is_admin(roles: frozenset[str]) -> bool:
    return ADMIN in roles

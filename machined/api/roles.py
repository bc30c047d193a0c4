"""Who may call what: Talos's roles, the one parser for them and the one per-method rule table.

Both machined and apid (:mod:`machined.apid.rules`) use this module; apid keeps only the
impersonation step (:func:`machined.apid.rules.effective_roles`). machined must not import apid.

**One role per value.** A role is one ``O=`` value of a client certificate, or one value of the
``talos-role`` gRPC metadata, with surrounding whitespace removed (Talos's ``role.Parse``). A value is
never split: ``O=x,os:admin`` is the single (unknown) role ``x,os:admin`` and grants nothing. Unknown
roles are kept for forward compatibility but grant nothing; a value that cannot be a role name at all
(anything but letters, digits and ``:._-``, or longer than :data:`MAX_ROLE_LEN`) is dropped, so every
role we hold travels as one metadata value with no encoding question.

**Roles arrive at machined as gRPC metadata ``talos-role``**, one value per role
(:func:`role_metadata`), the header Talos's apid sets before it calls machined. apid (and anything
else that proxies to machined) MUST set it from the authenticated client's certificate and MUST strip
it from what clients send. A ``talos-role`` header whose values hold no valid role grants nothing.

**A caller without that header is treated as ``os:admin``**: the unix socket's owner, group and mode
(0660 by default) are what admits a local process at all, exactly as filesystem permissions gate
``/run/machined/machine.sock`` on Talos. Never expose the socket to less trusted users.

Rules are Talos's (``internal/app/machined/pkg/system/services/machined.go`` and the COSI State rules),
including methods machined does not implement (those then fail UNIMPLEMENTED after authorization, as
upstream). A call is allowed when the caller's roles intersect the method's set; **a method not listed
needs ``os:admin``**.
"""

from __future__ import annotations

import re
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

MAX_ROLE_LEN = 128
# What a role name may look like (every known role does, and so would any future ``os:...`` one):
# letters, digits, ``:._-``. No comma, whitespace or control character: one role is always exactly one
# metadata value, and a proxy that joins repeated values with commas cannot forge one.
_ROLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]*")

A = frozenset({ADMIN})
AO = frozenset({ADMIN, OPERATOR})
AOR = frozenset({ADMIN, OPERATOR, READER})
AOE = frozenset({ADMIN, OPERATOR, ETCD_BACKUP})
AM = frozenset({ADMIN, META_WRITER})

_M = "/machine.MachineService/"


def _rules() -> dict[str, frozenset[str]]:
    r: dict[str, frozenset[str]] = {}
    for name in (
        "Version Hostname ServiceList Logs LogsContainers Events Dmesg List DiskUsage Mounts Memory "
        "LoadAvg SystemStat CPUInfo CPUFreqStats DiskStats NetworkDeviceStats Processes Netstat "
        "Containers Stats EtcdMemberList EtcdStatus EtcdAlarmList"
    ).split():
        r[_M + name] = AOR
    for name in "ServiceStart ServiceStop ServiceRestart Reboot Shutdown Restart PacketCapture".split():
        r[_M + name] = AO
    for name in (
        "ApplyConfiguration GenerateClientConfiguration Read Copy Reset Upgrade Rollback Kubeconfig"
    ).split():
        r[_M + name] = A
    r[_M + "MetaWrite"] = AM
    r[_M + "MetaDelete"] = AM
    r[_M + "EtcdSnapshot"] = AOE  # Talos: os:etcd:backup exists for exactly this call
    r["/cluster.ClusterService/HealthCheck"] = AOR
    r["/inspect.InspectService/ControllerRuntimeDependencies"] = AOR
    r["/storage.StorageService/Disks"] = AOR
    r["/time.TimeService/Time"] = AOR
    r["/time.TimeService/TimeCheck"] = AOR
    for verb in ("Get", "List", "Watch"):
        r[f"/cosi.resource.State/{verb}"] = AOR
    for verb in ("Create", "Update", "Destroy", "Teardown", "TeardownAndDestroy"):
        r[f"/cosi.resource.State/{verb}"] = A
    return r


RULES: dict[str, frozenset[str]] = _rules()


def _text(v: str | bytes) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def parse_role(value: str | bytes) -> str | None:
    """One certificate ``O=`` value or one ``talos-role`` value → the role, or None when it cannot be
    a role name (empty, too long, or holding a comma, whitespace or control character)."""
    r = _text(value).strip()
    if not r or len(r) > MAX_ROLE_LEN or not _ROLE.fullmatch(r):
        return None
    return r


def parse_roles(values: Iterable[str | bytes]) -> frozenset[str]:
    """Roles from certificate ``O=`` values or ``talos-role`` metadata values: each value is exactly
    one role (never split); values that cannot be a role are dropped; unknown roles are kept and
    grant nothing."""
    return frozenset(r for r in map(parse_role, values) if r is not None)


def role_values(metadata: Sequence[tuple[str, str | bytes]] | None) -> list[str | bytes] | None:
    """The raw ``talos-role`` values, or None when the header is absent (not: present but empty)."""
    values = [v for k, v in (metadata or ()) if k == ROLE_METADATA]
    return values if values else None


def roles_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> frozenset[str]:
    """The caller's roles: from ``talos-role``, or ``{os:admin}`` when the header is absent. A header
    that is present but names no valid role yields no roles (nothing is allowed)."""
    values = role_values(metadata)
    if values is None:
        return A
    return parse_roles(values)


def role_metadata(roles: Iterable[str]) -> list[tuple[str, str]]:
    """The ``talos-role`` metadata for ``roles``: one value per role, sorted. Refuses (ValueError) a
    value that is not a role, and an empty set: an absent header would mean ``os:admin``."""
    out = []
    for r in sorted(roles):
        if parse_role(r) != r:
            raise ValueError(f"not a role name: {r!r}")
        out.append((ROLE_METADATA, r))
    if not out:
        raise ValueError("no roles to forward: an absent talos-role header would mean os:admin")
    return out


def required_roles(method: str) -> frozenset[str]:
    return RULES.get(method, A)


def allowed(method: str, roles: Iterable[str]) -> bool:
    return bool(required_roles(method) & frozenset(roles))


def is_admin(roles: frozenset[str]) -> bool:
    return ADMIN in roles

"""apid's authorization: roles from the client certificate and a per-RPC rule table.

Roles are the ``O=`` values of the verified client leaf certificate (several allowed). A caller
holding ``os:impersonator`` (another apid forwarding a user's call) may name the roles to act with in
``talos-role`` metadata; those replace its certificate's roles. Unknown role strings are kept but
grant nothing. A method not in :data:`RULES` needs ``os:admin``.

The table is Talos's (``internal/app/machined/pkg/system/services/machined.go`` and the COSI State
rules, machined.md §1-§2), including methods machined does not implement (they then fail with
UNIMPLEMENTED after authorization, as upstream).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from machined.api.roles import ROLE_METADATA, parse_roles

ADMIN = "os:admin"
OPERATOR = "os:operator"
READER = "os:reader"
ETCD_BACKUP = "os:etcd:backup"
META_WRITER = "os:meta:writer"
IMPERSONATOR = "os:impersonator"

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
    for (
        name
    ) in "ApplyConfiguration GenerateClientConfiguration Read Copy Reset Upgrade Rollback Kubeconfig".split():
        r[_M + name] = A
    r[_M + "MetaWrite"] = AM
    r[_M + "MetaDelete"] = AM
    r[_M + "EtcdSnapshot"] = AOE
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


def required_roles(method: str) -> frozenset[str]:
    return RULES.get(method, A)


def allowed(method: str, roles: Iterable[str]) -> bool:
    return bool(required_roles(method) & frozenset(roles))


def effective_roles(
    cert_roles: frozenset[str], metadata: Sequence[tuple[str, str | bytes]] | None
) -> frozenset[str]:
    """The roles a call runs with: the certificate's, or — for an ``os:impersonator`` caller that sends
    ``talos-role`` metadata — those. Anyone else's ``talos-role`` metadata is ignored."""
    if IMPERSONATOR in cert_roles:
        values = [
            v.decode() if isinstance(v, bytes) else v for k, v in (metadata or ()) if k == ROLE_METADATA
        ]
        if values:
            return parse_roles(values)
    return cert_roles

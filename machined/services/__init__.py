"""Service supervision for machined: Talos's service states and events, restart policies with
back-off, health checks, SIGTERM-then-SIGKILL stops, per-service log rings, and start conditions on
other services and on the mesh.  See :mod:`machined.services.supervisor` for the state machine."""

from .health import HealthStatus, probe
from .logs import LogLine, LogRing
from .mesh import MeshHealth, mesh_condition, poll_mesh
from .process import Clock, Command, Process, Spawner, SpawnError, SystemClock, SystemSpawner
from .spec import (
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
from .states import EventKind, EventRing, ServiceEvent, ServiceState, Subscription, SubscriptionLagged
from .supervisor import MeshHook, ServiceStatus, Supervisor, UnknownService

__all__ = [
    "Backoff",
    "Clock",
    "Command",
    "EventKind",
    "EventRing",
    "HealthCheck",
    "HealthKind",
    "HealthStatus",
    "LogLine",
    "LogRing",
    "MeshHealth",
    "MeshHook",
    "MeshMode",
    "MeshRequirement",
    "OnMeshDegraded",
    "Process",
    "RestartPolicy",
    "Service",
    "ServiceConfigError",
    "ServiceEvent",
    "ServiceState",
    "ServiceStatus",
    "SpawnError",
    "Spawner",
    "Subscription",
    "SubscriptionLagged",
    "Supervisor",
    "SystemClock",
    "SystemSpawner",
    "UnknownService",
    "mesh_condition",
    "poll_mesh",
    "probe",
]

"""Machine config: Talos-compatible multi-document YAML plus the agent's own documents.

* :class:`MachineConfig` parses and validates (every problem names document, field path and rule;
  secrets never appear in messages) and derives what the mesh (:meth:`MachineConfig.mesh`) and the
  supervisor (:meth:`MachineConfig.services`) need.
* :mod:`.patch`: strategic merge and RFC 6902 JSON patches.
* :class:`ConfigStore`: atomic persistence of the active and staged config.
* :class:`ConfigManager`: apply modes AUTO, NO_REBOOT, STAGED, TRY (with rollback) and dry runs.
"""

from machined.config.apply import (
    DEFAULT_TRY_TIMEOUT,
    MAX_TRY_TIMEOUT,
    ApplyMode,
    ApplyResult,
    ConfigEvent,
    ConfigManager,
    LoopTimer,
    PendingTry,
    Timer,
    check_try_timeout,
)
from machined.config.documents import (
    DEFAULT_DISCOVERY_ENDPOINT,
    AgentSettings,
    CertificateAuthority,
    DiscoveryEndpoint,
    HealthCheck,
    KubeSpanSettings,
    MeshRequirement,
    ServiceSpec,
    V1Alpha1,
)
from machined.config.errors import ApplyError, ConfigValidationError, ConfigWarning, PatchError, Problem
from machined.config.machine import ChangeEffects, MachineConfig, MeshSettings
from machined.config.patch import JsonPatch, Patch, StrategicMergePatch, apply_patches, load_patch
from machined.config.store import ConfigStore

__all__ = [
    "DEFAULT_DISCOVERY_ENDPOINT",
    "DEFAULT_TRY_TIMEOUT",
    "MAX_TRY_TIMEOUT",
    "AgentSettings",
    "ApplyError",
    "ApplyMode",
    "ApplyResult",
    "CertificateAuthority",
    "ChangeEffects",
    "ConfigEvent",
    "ConfigManager",
    "ConfigStore",
    "ConfigValidationError",
    "ConfigWarning",
    "DiscoveryEndpoint",
    "HealthCheck",
    "JsonPatch",
    "KubeSpanSettings",
    "LoopTimer",
    "MachineConfig",
    "MeshRequirement",
    "MeshSettings",
    "Patch",
    "PatchError",
    "PendingTry",
    "Problem",
    "ServiceSpec",
    "StrategicMergePatch",
    "Timer",
    "V1Alpha1",
    "apply_patches",
    "check_try_timeout",
    "load_patch",
]

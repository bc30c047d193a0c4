"""Resource state: namespaced, typed, versioned, owner-checked, watchable (COSI's model, in asyncio).

See :mod:`machined.state.state` for write/copy semantics, :mod:`machined.state.watch`
for the bounded watch queue, :mod:`machined.state.definitions` for aliases and
print columns and :mod:`machined.state.catalog` for the types machined publishes.
"""

from .catalog import DEFINITIONS, MESH_DEFINITIONS, resolve_type
from .definitions import (
    META_NAMESPACE,
    RESOURCE_DEFINITION_TYPE,
    PrintColumn,
    ResourceDefinition,
    singularize,
)
from .errors import (
    AlreadyExistsError,
    AmbiguousTypeError,
    ConflictError,
    DefinitionError,
    FinalizersPendingError,
    NotFoundError,
    OwnerConflictError,
    PhaseConflictError,
    StateError,
    UnknownTypeError,
)
from .query import LabelOp, LabelQuery, LabelTerm
from .resource import Metadata, Phase, Resource, copy_value, dump_yaml, to_data
from .state import REGISTRY_OWNER, State, register_all
from .watch import Event, EventType, Watch

__all__ = [
    "DEFINITIONS",
    "MESH_DEFINITIONS",
    "META_NAMESPACE",
    "REGISTRY_OWNER",
    "RESOURCE_DEFINITION_TYPE",
    "AlreadyExistsError",
    "AmbiguousTypeError",
    "ConflictError",
    "DefinitionError",
    "Event",
    "EventType",
    "FinalizersPendingError",
    "LabelOp",
    "LabelQuery",
    "LabelTerm",
    "Metadata",
    "NotFoundError",
    "OwnerConflictError",
    "Phase",
    "PhaseConflictError",
    "PrintColumn",
    "Resource",
    "ResourceDefinition",
    "State",
    "StateError",
    "UnknownTypeError",
    "Watch",
    "copy_value",
    "dump_yaml",
    "register_all",
    "resolve_type",
    "singularize",
    "to_data",
]

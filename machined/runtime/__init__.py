"""Controller runtime: controllers declare inputs and outputs, wake on change, crash in isolation.

See :mod:`machined.runtime.controller` for declarations, :mod:`machined.runtime.context`
for what a run may read and write, and :mod:`machined.runtime.runtime` for scheduling.
"""

from .context import ControllerContext
from .controller import (
    AccessError,
    Controller,
    ControllerLike,
    Input,
    InputKind,
    Output,
    OutputKind,
    RegistrationError,
    WakeReason,
)
from .runtime import Backoff, ControllerStats, Dependency, Runtime, strong, weak

__all__ = [
    "AccessError",
    "Backoff",
    "Controller",
    "ControllerContext",
    "ControllerLike",
    "ControllerStats",
    "Dependency",
    "Input",
    "InputKind",
    "Output",
    "OutputKind",
    "RegistrationError",
    "Runtime",
    "WakeReason",
    "strong",
    "weak",
]

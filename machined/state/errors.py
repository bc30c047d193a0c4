"""Errors raised by the resource state.

Every message names the resource (``namespace/type/id``) and what was wrong,
so the API layer can pass it on unchanged (it maps the classes to gRPC codes).
"""

from __future__ import annotations


class StateError(Exception):
    """Base class of resource-state errors."""


class NotFoundError(StateError, KeyError):
    """The resource does not exist."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "not found"


class AlreadyExistsError(StateError):
    """``create`` of a resource that already exists."""


class ConflictError(StateError):
    """Optimistic-concurrency failure: the caller's version is not the stored one."""


class OwnerConflictError(StateError, PermissionError):
    """A write by someone other than the resource's owner."""


class PhaseConflictError(StateError):
    """The operation is not allowed in the resource's phase (e.g. a finalizer added while tearing down)."""


class FinalizersPendingError(StateError):
    """``destroy`` while finalizers are still present."""


class UnknownTypeError(StateError, LookupError):
    """A type argument matched no registered definition ("not registered")."""


class AmbiguousTypeError(StateError, LookupError):
    """A type argument matched several definitions ("ambiguous")."""


class DefinitionError(StateError, ValueError):
    """A resource definition is malformed."""

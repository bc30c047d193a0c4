"""What a controller declares: a name, inputs, outputs, an optional timer, and one reconcile step.

A controller is level-triggered: ``reconcile(ctx)`` reads its inputs through
``ctx``, computes the desired outputs and writes them; it must not depend on
*why* it was woken (``ctx.reason`` is informational). The runtime calls it
again whenever an input changes, on its timer, and after a crash (with backoff).

Inputs are ``(namespace, type[, id])``:

- ``WEAK``: a change wakes the controller; nothing more.
- ``STRONG``: also lets the controller put finalizers on the input
  (``ctx.add_finalizer``), blocking the input's destruction until released.

Outputs are resource types (any namespace):

- ``EXCLUSIVE``: this controller is the only one that may write the type
  (checked at registration).
- ``SHARED``: several controllers may write the type; each resource still
  belongs to the controller that created it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .context import ControllerContext


class InputKind(enum.StrEnum):
    WEAK = "weak"
    STRONG = "strong"


class OutputKind(enum.StrEnum):
    EXCLUSIVE = "exclusive"
    SHARED = "shared"


class WakeReason(enum.StrEnum):
    START = "start"  # the first run after registration
    INPUT = "input"  # an input changed
    TIMER = "timer"  # the controller's periodic timer fired
    RETRY = "retry"  # the previous run failed; this is the run after the backoff
    MANUAL = "manual"  # Runtime.wake()


@dataclass(frozen=True, slots=True)
class Input:
    namespace: str
    type: str
    id: str | None = None
    kind: InputKind = InputKind.WEAK

    def covers(self, namespace: str, type: str, id: str | None) -> bool:
        """Whether this input allows reading ``id`` (None: the whole collection)."""
        if (namespace, type) != (self.namespace, self.type):
            return False
        return self.id is None or self.id == id


@dataclass(frozen=True, slots=True)
class Output:
    type: str
    kind: OutputKind = OutputKind.EXCLUSIVE


class RegistrationError(ValueError):
    """A controller cannot be registered (bad name, duplicate, exclusive output clash)."""


class AccessError(PermissionError):
    """A controller read something that is not an input, or wrote something that is not an output."""


@runtime_checkable
class ControllerLike(Protocol):
    name: str
    inputs: Sequence[Input]
    outputs: Sequence[Output]

    async def reconcile(self, ctx: ControllerContext) -> None: ...


class Controller:
    """Convenience base class: set the class attributes, implement :meth:`reconcile`.

    ``interval`` (seconds) adds a periodic timer: the controller also runs
    when ``interval`` has passed since the last timer tick, even if no input
    changed.
    """

    name: str = ""
    inputs: Sequence[Input] = ()
    outputs: Sequence[Output] = ()
    interval: float | None = None

    async def reconcile(self, ctx: ControllerContext) -> None:
        raise NotImplementedError

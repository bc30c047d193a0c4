"""Applying a new machine config: modes AUTO, NO_REBOOT, STAGED and TRY, and dry runs.

:class:`ConfigManager` validates, persists (or stages, or tries with a rollback timer) and reports
what the change does to the running agent (:class:`ChangeEffects`); ``apply_async`` does the slow
parts in a worker thread. The modes' exact semantics, as in Talos: docs/design/config-apply.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypedDict, Unpack

from machined.config.errors import ApplyError, ConfigValidationError
from machined.config.machine import ChangeEffects, MachineConfig, change_effects, config_diff
from machined.config.patch import Patch, apply_patches
from machined.config.store import ConfigStore

log = logging.getLogger("machined.config")

DEFAULT_TRY_TIMEOUT = 60.0
MAX_TRY_TIMEOUT = 24 * 3600.0  # a TRY is meant to be confirmed within minutes; a day is already generous


def check_try_timeout(seconds: float) -> float:
    """``seconds`` if it is a usable TRY timeout, else ``ApplyError`` (invalid_argument) naming the range."""
    if not 0 < seconds <= MAX_TRY_TIMEOUT:  # NaN fails too
        raise ApplyError(
            "invalid_argument",
            f"try_mode_timeout: must be greater than 0 and at most {MAX_TRY_TIMEOUT:.0f} s (24h), "
            f"got {seconds:.6g} s",
        )
    return seconds


def _parse(text: str | bytes, dry_run: bool) -> MachineConfig:
    cfg = MachineConfig.parse(text)
    if not dry_run:
        cfg.canonical_yaml()  # rendered here rather than on the event loop by the MachineConfig resource
    return cfg


class ApplyMode(enum.IntEnum):
    """Numbered as Talos's ``machine.ApplyConfigurationRequest.Mode``."""

    REBOOT = 0
    AUTO = 1
    NO_REBOOT = 2
    STAGED = 3
    TRY = 4


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Timer(Protocol):
    """Clock and one-shot timers; inject :class:`machined.config.testing.ManualTimer` in tests."""

    def now(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable: ...


class LoopTimer:
    """The running asyncio loop's timers (monotonic clock)."""

    def now(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        return asyncio.get_running_loop().call_later(delay, callback)


@dataclass(frozen=True, slots=True)
class PendingTry:
    """A TRY apply waiting for confirmation."""

    config: MachineConfig  # running now, not persisted
    previous: MachineConfig  # what a rollback returns to (the persisted config)
    deadline: float  # Timer.now() value at which it rolls back
    timeout: float

    def remaining(self, now: float) -> float:
        return max(0.0, self.deadline - now)


@dataclass(frozen=True, slots=True)
class ConfigEvent:
    """The running config changed. ``reason``: boot, apply, try, rollback."""

    reason: str
    previous: MachineConfig | None
    current: MachineConfig
    effects: ChangeEffects


@dataclass(frozen=True, slots=True)
class ApplyResult:
    mode: ApplyMode  # the mode actually used (AUTO reports NO_REBOOT)
    mode_details: str
    warnings: tuple[str, ...]
    diff: str  # dry run: redacted unified diff against the running config ("No changes." when equal); else ""
    effects: ChangeEffects
    dry_run: bool = False
    pending: PendingTry | None = None


class ApplyOptions(TypedDict, total=False):
    """The keyword options of every apply (:meth:`ConfigManager.apply`, ``apply_async``, ``patch``)."""

    dry_run: bool  # change nothing; the result has the diff (default False)
    try_timeout: float  # TRY mode: seconds until the rollback (default DEFAULT_TRY_TIMEOUT)


Listener = Callable[[ConfigEvent], None]


class ConfigManager:
    """The running, persisted and staged configs of one agent and the apply modes between them."""

    def __init__(self, store: ConfigStore, *, timer: Timer | None = None) -> None:
        self.store = store
        self.timer: Timer = timer or LoopTimer()
        self._running: MachineConfig | None = None
        self._persisted: MachineConfig | None = None
        self._pending: PendingTry | None = None
        self._handle: Cancellable | None = None
        self._listeners: list[Listener] = []
        self._busy = False
        self.boot_notes: list[str] = []

    # -- state -------------------------------------------------------------------------------------

    @property
    def running(self) -> MachineConfig | None:
        """The config in effect now (a tried one while a TRY is pending)."""
        return self._running

    @property
    def persisted(self) -> MachineConfig | None:
        """The config the agent starts with next time (unless a staged one is promoted)."""
        return self._persisted

    @property
    def staged(self) -> MachineConfig | None:
        return self.store.load_staged()

    @property
    def pending(self) -> PendingTry | None:
        """The TRY apply waiting for confirmation, if any."""
        return self._pending

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` after every change of the running config; returns an unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # -- start -------------------------------------------------------------------------------------

    def boot(self, initial: MachineConfig | None = None) -> MachineConfig | None:
        """Load the config at agent start: promote a staged config, else the active one, else
        persist ``initial`` (used only when nothing is persisted). Returns the running config.

        An active file that does not validate raises ``ConfigValidationError``: better not start
        than run a guess. A staged file that does not validate is set aside (see ``ConfigStore``).
        """
        self.boot_notes = [f"removed leftover temporary file {p.name}" for p in self.store.sweep()]
        try:
            if self.store.promote_staged() is not None:
                self.boot_notes.append("promoted the staged config")
        except ConfigValidationError as e:
            self.boot_notes.append(f"staged config rejected, kept the active one: {e}")
        active = self.store.load_active()
        if active is None and initial is not None:
            self.store.save_active(initial)
            active = initial
        self._running = self._persisted = active
        if active is not None:
            self._emit(ConfigEvent("boot", None, active, change_effects(None, active)))
        return active

    # -- apply -------------------------------------------------------------------------------------

    def apply(
        self,
        config: MachineConfig | str | bytes,
        mode: ApplyMode = ApplyMode.AUTO,
        **options: Unpack[ApplyOptions],
    ) -> ApplyResult:
        """Validate and apply ``config`` (see the module docstring for the modes).

        Raises ``ConfigValidationError`` (invalid config: nothing changes) or ``ApplyError``.
        """
        steps = self._apply_steps(config, mode, **options)
        with contextlib.closing(steps):  # a raising step still runs the steps' cleanup
            try:
                work = next(steps)
                while True:
                    work = steps.send(work())
            except StopIteration as done:
                return done.value

    async def apply_async(
        self,
        config: MachineConfig | str | bytes,
        mode: ApplyMode = ApplyMode.AUTO,
        **options: Unpack[ApplyOptions],
    ) -> ApplyResult:
        """:meth:`apply` on the event loop: parsing, the dry run's diff and the store's writes (which
        parse the text again) run in a worker thread; the switch of the running config stays on the
        loop. A second change that arrives meanwhile is refused as in :meth:`apply`."""
        steps = self._apply_steps(config, mode, **options)
        with contextlib.closing(steps):
            try:
                work = next(steps)
                while True:
                    work = steps.send(await asyncio.to_thread(work))
            except StopIteration as done:
                return done.value

    def patch(
        self,
        patches: Iterable[Patch | str | bytes],
        mode: ApplyMode = ApplyMode.AUTO,
        **options: Unpack[ApplyOptions],
    ) -> ApplyResult:
        """Patch the running config (strategic merge and/or JSON patches, in order) and apply it."""
        if self._running is None:
            raise ApplyError("failed_precondition", "there is no config to patch")
        new = MachineConfig.from_documents(apply_patches(self._running.documents(), patches))
        return self.apply(new, mode, **options)

    def confirm(self) -> ApplyResult:
        """Make the pending TRY config permanent (an apply of it with NO_REBOOT)."""
        if self._pending is None:
            raise ApplyError("failed_precondition", "no TRY apply is waiting for confirmation")
        return self.apply(self._pending.config, ApplyMode.NO_REBOOT)

    def rollback(self) -> bool:
        """Roll a pending TRY back now (what its timer does). Returns False when nothing is pending."""
        if self._pending is None:
            return False
        pending = self._pending
        self._cancel_try()
        old = self._running
        self._running = pending.previous
        log.warning("TRY config not confirmed within %.0f s; rolled back", pending.timeout)
        self._emit(ConfigEvent("rollback", old, pending.previous, change_effects(old, pending.previous)))
        return True

    def close(self) -> None:
        """Cancel the rollback timer (agent shutdown: the persisted config is what runs next)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    # -- internals ---------------------------------------------------------------------------------

    def _apply_steps(
        self,
        config: MachineConfig | str | bytes,
        mode: ApplyMode | int,
        *,
        dry_run: bool = False,
        try_timeout: float = DEFAULT_TRY_TIMEOUT,
    ) -> Generator[Callable[[], Any], Any, ApplyResult]:
        """One apply for :meth:`apply` and :meth:`apply_async`: the blocking work (parsing, the dry
        run's diff, the store's writes) is yielded for the caller to run, inline or in a thread, and
        its result sent back; the in-memory switch happens here, between the yields."""
        used = self._check(mode, try_timeout)
        new = config if isinstance(config, MachineConfig) else (yield partial(_parse, config, dry_run))
        if dry_run:
            old = self._running
            return self._dry_run(used, old, new, try_timeout, (yield partial(config_diff, old, new)))
        self._check(mode, try_timeout)  # again: the state may have changed while parsing
        self._busy = True
        try:
            if used is not ApplyMode.TRY:
                yield partial(self._persist, used, new)
            return self._commit(used, new, try_timeout)
        finally:
            self._busy = False

    def _check(self, mode: ApplyMode | int, try_timeout: float) -> ApplyMode:
        """The mode actually used, or ``ApplyError`` when the request cannot be honoured now."""
        try:
            mode = ApplyMode(mode)
        except ValueError:
            raise ApplyError("invalid_argument", f"unknown apply mode {mode!r}") from None
        if mode is ApplyMode.REBOOT:
            raise ApplyError(
                "unimplemented", "apply mode REBOOT is not supported: nothing on this agent needs a reboot"
            )
        if self._busy:
            raise ApplyError("failed_precondition", "another configuration change is in progress")
        used = ApplyMode.NO_REBOOT if mode is ApplyMode.AUTO else mode
        if used is ApplyMode.TRY:
            check_try_timeout(try_timeout)
            if self._running is None:
                raise ApplyError("failed_precondition", "TRY needs a running config to roll back to")
        return used

    def _dry_run(
        self, used: ApplyMode, old: MachineConfig | None, new: MachineConfig, try_timeout: float, diff: str
    ) -> ApplyResult:
        effects = change_effects(old, new)
        return ApplyResult(
            used,
            f"dry run: {self._details(used, effects, try_timeout)}",
            tuple(str(w) for w in new.warnings),
            diff,
            effects,
            True,
            self._pending,
        )

    def _persist(self, used: ApplyMode, new: MachineConfig) -> None:
        """The store's part of an apply (no in-memory state: safe in a worker thread)."""
        if used is ApplyMode.NO_REBOOT:
            self.store.save_active(new)
            self.store.clear_staged()
        elif used is ApplyMode.STAGED:
            self.store.save_staged(new)

    def _commit(self, used: ApplyMode, new: MachineConfig, try_timeout: float) -> ApplyResult:
        """The running agent's part of an apply, after :meth:`_persist` succeeded."""
        old = self._running
        effects = change_effects(old, new)
        if used is ApplyMode.NO_REBOOT:
            self._cancel_try()
            self._persisted = self._running = new
            self._emit(ConfigEvent("apply", old, new, effects))
        elif used is ApplyMode.STAGED:
            self._cancel_try()
        else:
            assert old is not None
            previous = self._pending.previous if self._pending else old
            self._cancel_try()
            self._pending = PendingTry(new, previous, self.timer.now() + try_timeout, try_timeout)
            self._handle = self.timer.call_later(try_timeout, self._expire)
            self._running = new
            self._emit(ConfigEvent("try", old, new, effects))
        warnings = tuple(str(w) for w in new.warnings)
        return ApplyResult(
            used, self._details(used, effects, try_timeout), warnings, "", effects, False, self._pending
        )

    def _expire(self) -> None:
        self._handle = None
        self.rollback()

    def _cancel_try(self) -> None:
        self.close()
        self._pending = None

    def _details(self, used: ApplyMode, effects: ChangeEffects, try_timeout: float) -> str:
        if used is ApplyMode.STAGED:
            return "staged: takes effect at the next agent start"
        head = (
            "applied and persisted"
            if used is ApplyMode.NO_REBOOT
            else (f"applied without persisting; rolled back in {try_timeout:g} s unless confirmed")
        )
        return f"{head}; {effects.describe()}"

    def _emit(self, event: ConfigEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("config listener %r failed", getattr(listener, "__qualname__", listener))

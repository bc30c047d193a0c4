"""Service definitions: what to run, how to restart it, how to check it, what it waits for.

Values only; validation happens at construction and every error names the field and the rule
(``services[etcd].health.port: must be within 1..65535, got 0``).  :meth:`Service.from_dict` builds a
definition from a config document (snake_case keys; unknown keys are errors).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class ServiceConfigError(ValueError):
    """A definition field is invalid. ``field`` is the dotted path (``services[web].health.port``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _prefixed(prefix: str, e: ServiceConfigError) -> ServiceConfigError:
    return ServiceConfigError(f"{prefix}.{e.field}", e.message)


class RestartPolicy(enum.StrEnum):
    ALWAYS = "always"  # restart after any exit (Talos restart.Forever, the default)
    ON_FAILURE = "on-failure"  # restart after a non-zero exit or a signal (Talos UntilSuccess)
    NEVER = "never"  # run once (Talos Once)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential restart back-off: ``initial * factor**(n-1)`` seconds before the n-th consecutive
    restart, capped at ``max``.  A run that lasted at least ``reset_after`` seconds resets ``n``."""

    initial: float = 1.0
    factor: float = 2.0
    max: float = 30.0
    reset_after: float = 60.0

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise ServiceConfigError("initial", f"must be > 0 seconds, got {self.initial}")
        if not self.factor >= 1:
            raise ServiceConfigError("factor", f"must be >= 1, got {self.factor}")
        if not self.max >= self.initial:
            raise ServiceConfigError("max", f"must be >= initial ({self.initial}), got {self.max}")
        if not self.reset_after >= 0:
            raise ServiceConfigError("reset_after", f"must be >= 0 seconds, got {self.reset_after}")

    def delay(self, failures: int) -> float:
        """Seconds to wait before restart number ``failures`` (1-based) of a streak."""
        if failures <= 1:
            return self.initial
        # avoid float overflow for long streaks: once past the cap, stay there
        d = self.initial
        for _ in range(failures - 1):
            d *= self.factor
            if d >= self.max:
                return self.max
        return d


class HealthKind(enum.StrEnum):
    EXEC = "exec"  # run argv; healthy when it exits 0 within the timeout
    TCP = "tcp"  # healthy when host:port accepts a connection within the timeout
    HTTP = "http"  # healthy when GET url answers 2xx/3xx within the timeout (redirects not followed)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Talos defaults: first check 1 s after the process starts, then every 5 s, 500 ms timeout."""

    kind: HealthKind
    argv: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    url: str = ""
    interval: float = 5.0
    timeout: float = 0.5
    initial_delay: float = 1.0
    tls_verify: bool = True

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", HealthKind(self.kind))
        except ValueError:
            raise ServiceConfigError("kind", f"must be one of exec, tcp, http, got {self.kind!r}") from None
        object.__setattr__(self, "argv", tuple(self.argv))
        if self.kind is HealthKind.EXEC:
            if not self.argv or not all(isinstance(a, str) for a in self.argv):
                raise ServiceConfigError("argv", "an exec check needs a non-empty list of strings")
        elif self.kind is HealthKind.TCP:
            if not self.host:
                raise ServiceConfigError("host", "a tcp check needs a host")
            if not (isinstance(self.port, int) and 1 <= self.port <= 65535):
                raise ServiceConfigError("port", f"must be within 1..65535, got {self.port!r}")
        else:
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ServiceConfigError(
                    "url", f"must be an http:// or https:// URL with a host, got {self.url!r}"
                )
        for name, minimum, strict in (
            ("interval", 0, True),
            ("timeout", 0, True),
            ("initial_delay", 0, False),
        ):
            v = getattr(self, name)
            if not isinstance(v, int | float) or (v <= minimum if strict else v < minimum):
                raise ServiceConfigError(name, f"must be {'>' if strict else '>='} 0 seconds, got {v!r}")

    @classmethod
    def exec(cls, *argv: str, **kw: Any) -> HealthCheck:
        return cls(HealthKind.EXEC, argv=tuple(argv), **kw)

    @classmethod
    def tcp(cls, host: str, port: int, **kw: Any) -> HealthCheck:
        return cls(HealthKind.TCP, host=host, port=port, **kw)

    @classmethod
    def http(cls, url: str, **kw: Any) -> HealthCheck:
        return cls(HealthKind.HTTP, url=url, **kw)

    def describe(self) -> str:
        if self.kind is HealthKind.EXEC:
            return "exec " + " ".join(self.argv)
        if self.kind is HealthKind.TCP:
            return f"tcp {self.host}:{self.port}"
        return f"http {self.url}"


class MeshMode(enum.StrEnum):
    NONE = "none"  # the service does not care about the mesh
    READY = "ready"  # the mesh is up and every known peer is up (vacuously true with no peers)
    QUORUM = "quorum"  # the mesh is up and at least `quorum` remote peers are up (this node not counted)


@dataclass(frozen=True, slots=True)
class MeshRequirement:
    mode: MeshMode = MeshMode.NONE
    quorum: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", MeshMode(self.mode))
        except ValueError:
            raise ServiceConfigError("mode", f"must be none, ready or quorum, got {self.mode!r}") from None
        if self.mode is MeshMode.QUORUM:
            if not (isinstance(self.quorum, int) and self.quorum >= 1):
                raise ServiceConfigError("quorum", f"must be an integer >= 1, got {self.quorum!r}")
        elif self.quorum:
            raise ServiceConfigError("quorum", f"only applies to mode quorum, not {self.mode}")

    @classmethod
    def parse(cls, value: Any) -> MeshRequirement:
        """``"none"``, ``"ready"``, ``"quorum 2"`` / ``"quorum=2"``, ``{"quorum": 2}``, or an instance."""
        if value is None:
            return cls()
        if isinstance(value, MeshRequirement):
            return value
        if isinstance(value, Mapping):
            if set(value) == {"quorum"}:
                return cls(MeshMode.QUORUM, value["quorum"])
            if set(value) <= {"mode", "quorum"}:
                return cls(value.get("mode", "none"), value.get("quorum", 0))
            raise ServiceConfigError("mode", f"unknown keys {sorted(set(value) - {'mode', 'quorum'})}")
        if isinstance(value, str):
            m = re.fullmatch(r"\s*quorum\s*[ =:]\s*(\d+)\s*", value)
            if m:
                return cls(MeshMode.QUORUM, int(m.group(1)))
            return cls(value.strip())
        raise ServiceConfigError("mode", f"must be none, ready or 'quorum N', got {value!r}")

    def __str__(self) -> str:
        return f"quorum {self.quorum}" if self.mode is MeshMode.QUORUM else str(self.mode)


class OnMeshDegraded(enum.StrEnum):
    """What happens to a *running* service whose mesh condition stops holding.

    In every case the service gets a ``mesh-degraded`` event (and ``mesh-recovered`` later) and the
    supervisor's mesh hook is called.
    """

    IGNORE = "ignore"  # keep running (the default; like Talos, conditions only gate the start)
    STOP = "stop"  # stop it now; it waits for the mesh and starts again when the condition holds
    RESTART = "restart"  # keep running while degraded; restart it once the condition holds again


@dataclass(frozen=True, slots=True)
class Service:
    """One supervised service. ``argv[0]`` is looked up in ``PATH`` unless it contains a slash."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # may carry secrets
    cwd: str | None = None
    user: str | int | None = None  # name or uid; needs machined to run as root (or as that user)
    restart: RestartPolicy = RestartPolicy.ALWAYS
    backoff: Backoff = field(default_factory=Backoff)
    health: HealthCheck | None = None
    stop_timeout: float = 10.0  # SIGTERM, then SIGKILL to the process group after this many seconds
    depends_on: tuple[str, ...] = ()
    requires_mesh: MeshRequirement = field(default_factory=MeshRequirement)
    on_mesh_degraded: OnMeshDegraded = OnMeshDegraded.IGNORE
    enabled: bool = True  # False: the service is Skipped (and counts as up for its dependents)
    log_lines: int = 2000  # lines kept in memory
    log_file: str | None = None  # also append every line here

    def __post_init__(self) -> None:
        where = f"services[{self.name}]" if isinstance(self.name, str) and self.name else "services[?]"
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ServiceConfigError(
                f"{where}.name",
                f"must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit; got {self.name!r}",
            )
        if isinstance(self.argv, str):
            raise ServiceConfigError(f"{where}.argv", "must be a list of strings, not a single string")
        argv = tuple(self.argv)
        if not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
            raise ServiceConfigError(f"{where}.argv", "must be a non-empty list of strings")
        object.__setattr__(self, "argv", argv)
        if not isinstance(self.env, Mapping) or not all(
            isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in self.env.items()
        ):
            raise ServiceConfigError(f"{where}.env", "must map variable names (no '=') to strings")
        object.__setattr__(self, "env", dict(self.env))
        if self.user is not None and not (isinstance(self.user, int | str) and str(self.user)):
            raise ServiceConfigError(f"{where}.user", f"must be a user name or uid, got {self.user!r}")
        try:
            object.__setattr__(self, "restart", RestartPolicy(self.restart))
        except ValueError:
            raise ServiceConfigError(
                f"{where}.restart", f"must be always, on-failure or never, got {self.restart!r}"
            ) from None
        try:
            object.__setattr__(self, "on_mesh_degraded", OnMeshDegraded(self.on_mesh_degraded))
        except ValueError:
            raise ServiceConfigError(
                f"{where}.on_mesh_degraded", f"must be ignore, stop or restart, got {self.on_mesh_degraded!r}"
            ) from None
        try:
            object.__setattr__(self, "requires_mesh", MeshRequirement.parse(self.requires_mesh))
        except ServiceConfigError as e:
            raise _prefixed(f"{where}.requires_mesh", e) from None
        if not isinstance(self.stop_timeout, int | float) or self.stop_timeout <= 0:
            raise ServiceConfigError(
                f"{where}.stop_timeout", f"must be > 0 seconds, got {self.stop_timeout!r}"
            )
        if isinstance(self.depends_on, str):
            raise ServiceConfigError(f"{where}.depends_on", "must be a list of service names, not a string")
        deps = tuple(self.depends_on)
        for d in deps:
            if not isinstance(d, str) or not NAME_RE.match(d):
                raise ServiceConfigError(f"{where}.depends_on", f"{d!r} is not a valid service name")
        if self.name in deps:
            raise ServiceConfigError(f"{where}.depends_on", "a service cannot depend on itself")
        if len(set(deps)) != len(deps):
            raise ServiceConfigError(f"{where}.depends_on", "lists a service twice")
        object.__setattr__(self, "depends_on", deps)
        if not isinstance(self.log_lines, int) or not 1 <= self.log_lines <= 1_000_000:
            raise ServiceConfigError(
                f"{where}.log_lines", f"must be within 1..1000000, got {self.log_lines!r}"
            )
        if self.log_file is not None and (not isinstance(self.log_file, str) or not self.log_file):
            raise ServiceConfigError(f"{where}.log_file", "must be a non-empty path")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Service:
        """Build from a config mapping (snake_case keys, as the dataclass fields).

        ``health`` is ``{kind, argv|host+port|url, interval, timeout, initial_delay, tls_verify}``,
        ``backoff`` is ``{initial, factor, max, reset_after}``, ``requires_mesh`` is as
        :meth:`MeshRequirement.parse`.
        """
        name = doc.get("name") if isinstance(doc, Mapping) else None
        where = f"services[{name}]" if isinstance(name, str) and name else "services[?]"
        if not isinstance(doc, Mapping):
            raise ServiceConfigError(where, "must be a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ServiceConfigError(
                f"{where}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})"
            )
        kw = dict(doc)
        for key in ("argv", "depends_on"):
            if key in kw and isinstance(kw[key], Sequence) and not isinstance(kw[key], str):
                kw[key] = tuple(kw[key])
        if isinstance(kw.get("backoff"), Mapping):
            kw["backoff"] = _sub(Backoff, kw["backoff"], f"{where}.backoff")
        if isinstance(kw.get("health"), Mapping):
            h = dict(kw["health"])
            if isinstance(h.get("argv"), Sequence) and not isinstance(h.get("argv"), str):
                h["argv"] = tuple(h["argv"])
            kw["health"] = _sub(HealthCheck, h, f"{where}.health")
        if "name" not in kw or "argv" not in kw:
            raise ServiceConfigError(f"{where}.{'name' if 'name' not in kw else 'argv'}", "is required")
        return cls(**kw)


def _sub(cls: type, doc: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ServiceConfigError(
            f"{where}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})"
        )
    try:
        return cls(**doc)
    except ServiceConfigError as e:
        raise _prefixed(where, e) from None
    except TypeError as e:
        raise ServiceConfigError(where, str(e)) from None

"""Reading one config document field by field: types, ranges, paths in messages, unused fields.

A :class:`Reader` wraps one raw document (a ``dict`` from YAML). Each accessor takes a dotted path,
records that the path is used, checks the value and reports a :class:`Problem` naming the document,
the path and the rule when something is wrong, returning the default so parsing can go on and collect
every problem. ``null`` reads as absent. Values of secret fields (see :mod:`machined.config.redact`)
are never quoted in a rule; other values are, shortened.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from machined.config import talos_keys
from machined.config.errors import ConfigWarning, Problem
from machined.config.redact import is_secret_path
from spanutil.durations import parse_duration

T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Sink:
    """Collects problems and warnings in order, without duplicates."""

    def __init__(self) -> None:
        self._problems: dict[Problem, None] = {}
        self.warnings: list[ConfigWarning] = []

    def problem(self, p: Problem) -> None:
        self._problems[p] = None

    def warn(self, w: ConfigWarning) -> None:
        self.warnings.append(w)

    @property
    def problems(self) -> tuple[Problem, ...]:
        return tuple(self._problems)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


UNKNOWN_RULE = (
    "a Talos node refuses unknown fields, and so does machined unless started with --config-lenient "
    "(or MACHINED_CONFIG_LENIENT=1)"
)
LENIENT_MESSAGE = (
    "fields unknown to Talos: a Talos node refuses this document (accepted because strict checking is off: "
    "--config-lenient / MACHINED_CONFIG_LENIENT)"
)


def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split(".")) if path else ()


def _join(parts: Iterable[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


class Reader:
    """Typed access to one document; see the module docstring."""

    def __init__(
        self,
        sink: Sink,
        label: str,
        index: int,
        kind: str,
        data: dict[str, Any],
        *,
        known: talos_keys.KeyTree | None = None,
        strict: bool = True,
    ) -> None:
        self.sink = sink
        self.label = label
        self.index = index
        self.kind = kind
        self.data = data
        self.used: set[tuple[str, ...]] = set()
        self.known = known  # a Talos document's key tree (talos_keys.TREES): checked by warn_unused
        self.strict = strict  # keys Talos does not know: errors (True) or one warning (False)

    # -- reporting ---------------------------------------------------------------------------------

    def fail(self, path: str | tuple[str | int, ...], rule: str) -> None:
        text = path if isinstance(path, str) else _join(path)
        self.sink.problem(Problem(self.label, self.index, text, rule))

    def warn(self, message: str, paths: Iterable[str] = ()) -> None:
        self.sink.warn(ConfigWarning(self.label, self.index, message, tuple(paths)))

    def show(self, path: tuple[str | int, ...], value: object) -> str:
        """``got <value>`` for messages; only the type for secret fields."""
        if (
            is_secret_path(self.kind, path)
            or not isinstance(value, str | int | float)
            or isinstance(value, bool)
        ):
            return f"got {_type_name(value)}"
        text = repr(value)
        if len(text) > 60:
            text = text[:57] + "..."
        return f"got {text}"

    # -- raw access --------------------------------------------------------------------------------

    def raw(self, path: str) -> Any:
        """The value at ``path`` (marked used), or ``MISSING`` when absent or null."""
        parts = _split(path)
        self.used.add(parts)
        node: Any = self.data
        for i, key in enumerate(parts):
            if not isinstance(node, dict):
                where = parts[:i]
                self.fail(".".join(where), f"must be a mapping, {self.show(where, node)}")
                return MISSING
            if node.get(key) is None:
                return MISSING
            node = node[key]
        return node

    def present(self, path: str) -> bool:
        """Whether ``path`` holds a non-null value (does not mark it used)."""
        node: Any = self.data
        for key in _split(path):
            if not isinstance(node, dict) or node.get(key) is None:
                return False
            node = node[key]
        return True

    # -- typed access ------------------------------------------------------------------------------

    def boolean(self, path: str, default: bool) -> bool:
        v = self.raw(path)
        if v is MISSING:
            return default
        if not isinstance(v, bool):
            self.fail(path, f"must be true or false, {self.show(_split(path), v)}")
            return default
        return v

    def integer(self, path: str, default: T, low: int | None = None, high: int | None = None) -> int | T:
        """An integer; without ``low`` and ``high`` only the type is checked (the value's own
        validator, such as ``MeshConfig``, checks the range)."""
        v = self.raw(path)
        if v is MISSING:
            return default
        return self.check_int(_split(path), v, default, low, high)

    def check_int(
        self, parts: tuple[str | int, ...], v: object, default: T, low: int | None, high: int | None
    ) -> int | T:
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(parts, f"must be an integer, {self.show(parts, v)}")
            return default
        if low is not None and high is not None and not low <= v <= high:
            self.fail(parts, f"must be between {low} and {high}, {self.show(parts, v)}")
            return default
        return v

    def string(self, path: str, default: str | None = None, *, required: bool = False) -> str | None:
        v = self.raw(path)
        if v is MISSING:
            if required:
                self.fail(path, "is required")
            return default
        if not isinstance(v, str):
            self.fail(path, f"must be a string, {self.show(_split(path), v)}")
            return default
        return v

    def choice(self, path: str, default: str, choices: tuple[str, ...], *, required: bool = False) -> str:
        v = self.raw(path)
        if v is MISSING:
            if required:
                self.fail(path, f"is required (one of {', '.join(choices)})")
            return default
        if v not in choices:
            self.fail(path, f"must be one of {', '.join(choices)}, {self.show(_split(path), v)}")
            return default
        return v

    def strings(self, path: str) -> tuple[str, ...]:
        v = self.raw(path)
        if v is MISSING:
            return ()
        parts = _split(path)
        if not isinstance(v, list):
            self.fail(path, f"must be a list of strings, {self.show(parts, v)}")
            return ()
        out: list[str] = []
        for i, item in enumerate(v):
            if not isinstance(item, str):
                self.fail((*parts, i), f"must be a string, {self.show((*parts, i), item)}")
            else:
                out.append(item)
        return tuple(out)

    def items(self, path: str, parse: Callable[[str], T], rule: str) -> tuple[T, ...]:
        """A list of strings each turned into a value by ``parse`` (which raises ``ValueError``)."""
        v = self.raw(path)
        if v is MISSING:
            return ()
        parts = _split(path)
        if not isinstance(v, list):
            self.fail(path, f"must be a list, {self.show(parts, v)}")
            return ()
        out: list[T] = []
        for i, item in enumerate(v):
            if not isinstance(item, str):
                self.fail((*parts, i), f"{rule}, {self.show((*parts, i), item)}")
                continue
            try:
                out.append(parse(item))
            except ValueError as e:
                # a parser that says which rule broke (``reason``, e.g. HostPortError) adds it
                why = getattr(e, "reason", None)
                self.fail(
                    (*parts, i), f"{rule}, {self.show((*parts, i), item)}" + (f": {why}" if why else "")
                )
        return tuple(out)

    def mapping(self, path: str) -> dict[str, Any] | None:
        v = self.raw(path)
        if v is MISSING:
            return None
        if not isinstance(v, dict):
            self.fail(path, f"must be a mapping, {self.show(_split(path), v)}")
            return None
        return v

    def seconds(self, path: str, default: float, *, allow_zero: bool = False) -> float:
        v = self.raw(path)
        if v is MISSING:
            return default
        try:
            value = parse_duration(v)
        except ValueError:
            self.fail(path, f"must be a duration such as 500ms, 5s or 1m30s, {self.show(_split(path), v)}")
            return default
        if value == 0 and not allow_zero:  # parse_duration refuses negative ones
            self.fail(path, f"must be greater than 0, {self.show(_split(path), v)}")
            return default
        return value

    # -- fields nobody read ------------------------------------------------------------------------

    def unused(self) -> list[tuple[str, ...]]:
        """Paths present in the document that no accessor asked for (the shortest such paths)."""
        used = self.used
        prefixes = {u[:i] for u in used for i in range(1, len(u))}
        out: list[tuple[str, ...]] = []

        def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
            for k, v in node.items():
                p = (*path, k)
                if p in used or v is None:
                    continue
                if p in prefixes and isinstance(v, dict):
                    walk(v, p)
                    continue
                out.append(p)

        walk(self.data, ())
        return out

    def suggestion(self, path: tuple[str, ...], cutoff: float = 0.85) -> str:
        """`` (did you mean X?)`` when an unused key is close to a used one at the same level."""
        siblings = {
            u[len(path) - 1] for u in self.used if len(u) >= len(path) and u[: len(path) - 1] == path[:-1]
        }
        close = difflib.get_close_matches(path[-1], sorted(siblings), n=1, cutoff=cutoff)
        return f" (did you mean {close[0]!r}?)" if close else ""

    def reject_unknown(self) -> None:
        """Our own documents: every field nobody read is an error."""
        for p in self.unused():
            self.fail(".".join(p), f"unknown field{self.suggestion(p, 0.6)}")

    def warn_unused(self, message: str) -> None:
        """Talos documents: fields we do not use are accepted and listed in one warning.

        With a key tree (``known``), keys Talos itself does not know come first: each is an error
        when ``strict`` (a Talos node refuses the document), else they are listed in a warning of
        their own; either way they are not listed again as merely unused."""
        unknown = talos_keys.unknown_paths(self.known, self.data) if self.known is not None else []
        if unknown and self.strict:
            for p in unknown:
                hint = talos_keys.suggestion(self.known or {}, p)
                self.fail(p, f"unknown field{f' ({hint})' if hint else ''}: {UNKNOWN_RULE}")
        elif unknown:
            self.warn(LENIENT_MESSAGE, [f"{self.label}.{_join(p)}" for p in unknown])
        skip = {p for p in unknown if all(isinstance(k, str) for k in p)}
        unused = [
            p for p in self.unused() if not any(p[: len(u)] == u for u in skip)
        ]  # an unknown key (or one under it) is reported above
        if not unused:
            return
        hints = [f"{'.'.join(p)}{self.suggestion(p)}" for p in unused if self.suggestion(p)]
        if hints:
            message += f"; possible typos: {', '.join(hints)}"
        self.warn(message, [f"{self.label}.{'.'.join(p)}" for p in unused])

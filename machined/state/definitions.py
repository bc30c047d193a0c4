"""Resource definitions: names, aliases, default namespace, print columns, sensitivity.

As in COSI, definitions are themselves resources: type
``ResourceDefinitions.meta.cosi.dev`` in namespace ``meta``, id = the
lower-cased type. A type is ``<Plural>.<group>`` (``KubeSpanPeerStatuses.kubespan.talos.dev``).
The aliases a client may type are generated the way talosctl expects:

- the singular (``kubespanpeerstatus``) and the plural (``kubespanpeerstatuses``),
- the plural with each proper prefix of the group (``kubespanpeerstatuses.kubespan``,
  ``kubespanpeerstatuses.kubespan.talos``; the full type is the id),
- the abbreviation made of the plural's capital letters (``ksps``),

plus any explicit aliases (``links`` for LinkStatuses). Matching is
case-insensitive against the id and every alias; :func:`resolve` raises
"not registered" or "ambiguous".

Print columns are a name and a small JSONPath over the spec's YAML data:
``{.field}``, ``{.a.b}``, ``{.list[0]}``, ``{.list[*].field}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import AmbiguousTypeError, DefinitionError, UnknownTypeError

META_NAMESPACE = "meta"
RESOURCE_DEFINITION_TYPE = "ResourceDefinitions.meta.cosi.dev"

_TYPE_RE = re.compile(r"^(?P<plural>[A-Z][A-Za-z0-9]*)\.(?P<group>[a-z0-9]+(?:[.-][a-z0-9]+)*)$")
_PATH_TOKEN = re.compile(r"\.(?P<name>[^.\[\]{}]+)|\[(?P<index>\*|-?\d+)\]")

_MISSING = object()


def _parse_path(path: str) -> tuple[str | int, ...]:
    text = path.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1].strip()
    if text in ("", "."):
        return ()
    steps: list[str | int] = []
    pos = 0
    while pos < len(text):
        m = _PATH_TOKEN.match(text, pos)
        if not m:
            raise DefinitionError(f"print column JSONPath {path!r}: cannot parse at {text[pos:]!r}")
        if m["name"] is not None:
            steps.append(m["name"])
        else:
            steps.append(_STAR if m["index"] == "*" else int(m["index"]))
        pos = m.end()
    return tuple(steps)


class _Star(str):
    """Marker for ``[*]`` (a str subclass so the step tuple stays simply typed)."""


_STAR = _Star("*")


def _walk(values: list[Any], step: str | int) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if step is _STAR:
            if isinstance(v, list):
                out.extend(v)
            elif isinstance(v, dict):
                out.extend(v.values())
        elif isinstance(step, int):
            if isinstance(v, list) and -len(v) <= step < len(v):
                out.append(v[step])
        elif isinstance(v, dict) and step in v:
            out.append(v[step])
    return out


_GO_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def go_json(v: Any, indent: int | None = None) -> str:
    """JSON as Go's ``encoding/json`` writes it (what talosctl prints for lists and maps): map keys
    sorted, non-ASCII kept, ``<``, ``>``, ``&`` and U+2028/2029 escaped; compact unless ``indent``."""
    text = json.dumps(
        v,
        sort_keys=True,
        ensure_ascii=False,
        default=str,
        indent=indent,
        separators=(",", ": ") if indent is not None else (",", ":"),
    )
    for ch, esc in _GO_JSON_ESCAPES.items():
        text = text.replace(ch, esc)
    return text


def go_text(v: Any) -> str:
    """A scalar as Go's ``fmt.Print`` shows it (lists and maps: :func:`go_json`)."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple, dict)):
        return go_json(v)
    return str(v)


def _cell(v: Any) -> str:
    return go_text(v)


@dataclass(frozen=True, slots=True)
class PrintColumn:
    """An extra table column: ``name`` (shown upper-case) and a JSONPath over the spec."""

    name: str
    json_path: str
    _steps: tuple[str | int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise DefinitionError("print column: name must not be empty")
        object.__setattr__(self, "_steps", _parse_path(self.json_path))

    def render(self, data: Any) -> str:
        """The cell for one resource's spec data ("" when the path is absent)."""
        values = [data]
        for step in self._steps:
            values = _walk(values, step)
        return " ".join(_cell(v) for v in values)

    def to_data(self) -> dict[str, str]:
        return {"name": self.name, "jsonPath": self.json_path}


def singularize(plural: str) -> str:
    """English singular of a CamelCase plural, good enough for resource names."""
    if plural.endswith("ies"):
        return plural[:-3] + "y"
    if plural.endswith(("sses", "uses", "xes", "ches", "shes", "zes")):
        return plural[:-2]
    if plural.endswith("s") and not plural.endswith("ss"):
        return plural[:-1]
    return plural


@dataclass(frozen=True, slots=True)
class ResourceDefinition:
    """What the API and CLI need to know about one resource type."""

    type: str
    default_namespace: str
    singular: str = ""
    aliases: tuple[str, ...] = ()
    print_columns: tuple[PrintColumn, ...] = ()
    sensitive: bool = False
    all_aliases: tuple[str, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        m = _TYPE_RE.match(self.type)
        if not m:
            raise DefinitionError(
                f"resource definition {self.type!r}: type must be <Plural>.<group> "
                "(a capitalised CamelCase plural, a lower-case dotted group)"
            )
        if not self.default_namespace:
            raise DefinitionError(f"resource definition {self.type!r}: default_namespace must not be empty")
        plural, group = m["plural"], m["group"]
        singular = self.singular or singularize(plural)
        object.__setattr__(self, "singular", singular)
        object.__setattr__(self, "aliases", tuple(a.lower() for a in self.aliases))
        object.__setattr__(self, "print_columns", tuple(self.print_columns))
        generated = [singular.lower(), plural.lower()]
        parts = group.split(".")
        generated += [plural.lower() + "." + ".".join(parts[:i]) for i in range(1, len(parts))]
        generated.append("".join(c for c in plural if c.isupper()).lower())
        seen: dict[str, None] = {}
        for a in (*self.aliases, *generated):
            if a and a != self.id:
                seen.setdefault(a, None)
        object.__setattr__(self, "all_aliases", tuple(seen))

    @property
    def id(self) -> str:
        return self.type.lower()

    @property
    def display_type(self) -> str:
        """The plural part, e.g. ``KubeSpanPeerStatuses``."""
        return self.type.split(".", 1)[0]

    @property
    def plural(self) -> str:
        return self.display_type

    @property
    def group(self) -> str:
        return self.type.split(".", 1)[1]

    def matches(self, arg: str) -> bool:
        a = arg.lower()
        return a == self.id or a in self.all_aliases

    def columns(self, spec_data: Any) -> list[str]:
        """Print-column cells for one resource's spec data (see :meth:`Resource.spec_data`)."""
        return [c.render(spec_data) for c in self.print_columns]

    def to_data(self) -> dict[str, Any]:
        """The definition as the ``spec`` of its ``ResourceDefinitions.meta.cosi.dev`` resource."""
        return {
            "type": self.type,
            "displayType": self.display_type,
            "singular": self.singular,
            "defaultNamespace": self.default_namespace,
            "aliases": list(self.aliases),
            "allAliases": list(self.all_aliases),
            "printColumns": [c.to_data() for c in self.print_columns],
            "sensitivity": "sensitive" if self.sensitive else "non-sensitive",
        }


def resolve(arg: str, definitions: Iterable[ResourceDefinition]) -> ResourceDefinition:
    """The one definition ``arg`` names (case-insensitive id or alias)."""
    if not arg:
        raise UnknownTypeError("resource type must not be empty")
    hits = [d for d in definitions if d.matches(arg)]
    if not hits:
        raise UnknownTypeError(f'resource "{arg}" is not registered')
    if len(hits) > 1:
        names = ", ".join(sorted(d.type for d in hits))
        raise AmbiguousTypeError(f'resource type "{arg}" is ambiguous: {names}')
    return hits[0]


RESOURCE_DEFINITIONS = ResourceDefinition(RESOURCE_DEFINITION_TYPE, META_NAMESPACE)

"""``get -o jsonpath=TEMPLATE``: the subset of kubectl/talosctl JSONPath templates spanctl supports.

A template is text with ``{expression}`` parts, evaluated over each resource as the JSON output shows
it (``node``, ``metadata``, ``spec``, and ``event`` when watching). Expressions: ``.field``,
``['field']`` / ``["field"]`` (names with dots, e.g. label keys), ``[N]`` (negative counts from the
end), ``[*]`` and ``.*`` (every element or value), an optional leading ``$``; ``{.}`` or ``{$}`` is
the whole resource. Not supported (refused when parsed): ``range``/``end``, filters ``[?()]``,
slices ``[a:b]``, unions ``[a,b]`` and recursive descent ``..``.

Output follows talosctl: every result on its own line; lists and maps as indented JSON (4 spaces,
sorted keys), scalars as text; literal text between expressions is a result too. A key or index
that is absent is an error (``... is not found``), as without kubectl's ``--allow-missing-template-keys``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from machined.state.definitions import go_json, go_text


class JSONPathError(ValueError):
    """A template that cannot be parsed, or a path absent from a resource."""


class _Every:
    """The ``[*]`` / ``.*`` step."""

    def __repr__(self) -> str:
        return "[*]"


EVERY = _Every()
Step = str | int | _Every

_STEP = re.compile(
    r"""\.(?P<star>\*)
      | \.(?P<name>[A-Za-z0-9_\-/$@]+)
      | \[\s*(?:'(?P<sq>[^']*)'|"(?P<dq>[^"]*)"|(?P<index>-?\d+)|(?P<all>\*))\s*\]""",
    re.VERBOSE,
)
_UNSUPPORTED = (
    ("..", "recursive descent (..)"),
    ("[?", "filters ([?()])"),
)


@dataclass(frozen=True, slots=True)
class _Expr:
    text: str
    steps: tuple[Step, ...]


def parse_expression(text: str) -> tuple[Step, ...]:
    """The steps of one ``{...}`` expression (without the braces)."""
    expr = text.strip()
    first = expr.split(None, 1)[0] if expr else ""
    if first in ("range", "end"):
        raise JSONPathError(f"jsonpath {{{text}}}: {first} is not supported")
    for token, what in _UNSUPPORTED:
        if token in expr:
            raise JSONPathError(f"jsonpath {{{text}}}: {what} is not supported")
    if expr.startswith("$"):
        expr = expr[1:]
    if expr in ("", "."):
        return ()
    if not expr.startswith((".", "[")):
        expr = "." + expr  # kubectl accepts {metadata.id} as {.metadata.id}
    steps: list[Step] = []
    pos = 0
    while pos < len(expr):
        m = _STEP.match(expr, pos)
        if not m:
            raise JSONPathError(f"jsonpath {{{text}}}: cannot parse at {expr[pos:]!r}")
        if m["star"] or m["all"]:
            steps.append(EVERY)
        elif m["index"] is not None:
            steps.append(int(m["index"]))
        else:
            steps.append(next(g for g in (m["name"], m["sq"], m["dq"]) if g is not None))
        pos = m.end()
    return tuple(steps)


class Template:
    """A parsed ``jsonpath=`` template."""

    def __init__(self, template: str) -> None:
        self.source = template
        self.parts: list[str | _Expr] = []
        pos = 0
        while pos < len(template):
            start = template.find("{", pos)
            if start < 0:
                self.parts.append(template[pos:])
                break
            if start > pos:
                self.parts.append(template[pos:start])
            end = template.find("}", start)
            if end < 0:
                raise JSONPathError(f"jsonpath {template!r}: unclosed {{")
            inner = template[start + 1 : end]
            self.parts.append(_Expr(inner, parse_expression(inner)))
            pos = end + 1
        if not any(isinstance(p, _Expr) for p in self.parts):
            raise JSONPathError(f"jsonpath {template!r}: no {{expression}} in the template")

    def results(self, data: Any) -> Iterator[Any]:
        """Every result, in order (literal text included)."""
        for part in self.parts:
            if isinstance(part, str):
                yield part
                continue
            values = [data]
            for step in part.steps:
                values = _walk(values, step, part.text)
            yield from values

    def render(self, data: Any) -> str:
        """What talosctl prints for one resource: each result on its own line."""
        return "".join(
            (go_json(v, indent=4) if isinstance(v, (dict, list)) else go_text(v)) + "\n"
            for v in self.results(data)
        )


def _walk(values: list[Any], step: Step, expr: str) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if step is EVERY:
            if isinstance(v, list):
                out.extend(v)
            elif isinstance(v, dict):
                out.extend(v[k] for k in sorted(v))
            else:
                raise JSONPathError(f"jsonpath {{{expr}}}: [*] of a {type(v).__name__}")
        elif isinstance(step, int):
            if not isinstance(v, list):
                raise JSONPathError(f"jsonpath {{{expr}}}: [{step}] of a non-list")
            if not -len(v) <= step < len(v):
                raise JSONPathError(
                    f"jsonpath {{{expr}}}: array index out of bounds: index {step}, length {len(v)}"
                )
            out.append(v[step])
        else:
            if not isinstance(v, dict) or step not in v:
                raise JSONPathError(f"jsonpath {{{expr}}}: {step} is not found")
            out.append(v[step])
    return out


FORMAT_PREFIX = "jsonpath="


def parse_format(fmt: str) -> Template | None:
    """The template of an ``-o jsonpath=...`` value; None for other formats."""
    if not fmt.startswith(FORMAT_PREFIX):
        if fmt == "jsonpath":
            raise JSONPathError("output format jsonpath needs a template: -o jsonpath='{.spec}'")
        return None
    return Template(fmt[len(FORMAT_PREFIX) :])

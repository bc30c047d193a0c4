"""Label queries for ``State.list`` (COSI's ``LabelTerm``: exists, equal, in; each may be inverted).

``LabelQuery.parse("role=node,!draining,zone in (a,b),tier!=db")`` accepts the
Kubernetes selector syntax: ``key``, ``!key``, ``key=value`` (or ``==``),
``key!=value``, ``key in (v1,v2)`` and ``key notin (v1,v2)``. All terms must
match. An inverted term matches resources that lack the key.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class LabelOp(enum.Enum):
    EXISTS = "exists"
    EQUAL = "equal"
    IN = "in"


@dataclass(frozen=True, slots=True)
class LabelTerm:
    key: str
    op: LabelOp = LabelOp.EXISTS
    values: tuple[str, ...] = ()
    invert: bool = False

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("label term: key must not be empty")
        if self.op is LabelOp.EQUAL and len(self.values) != 1:
            raise ValueError(
                f"label term {self.key!r}: equal takes exactly one value, got {len(self.values)}"
            )

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op is LabelOp.EXISTS:
            hit = self.key in labels
        else:
            value = labels.get(self.key)
            hit = value is not None and value in self.values
        return hit != self.invert


@dataclass(frozen=True, slots=True)
class LabelQuery:
    terms: tuple[LabelTerm, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(t.matches(labels) for t in self.terms)

    @classmethod
    def equal(cls, labels: Mapping[str, str]) -> LabelQuery:
        """Every ``key: value`` pair must be present."""
        return cls(tuple(LabelTerm(k, LabelOp.EQUAL, (v,)) for k, v in labels.items()))

    @classmethod
    def of(cls, terms: Iterable[LabelTerm]) -> LabelQuery:
        return cls(tuple(terms))

    @classmethod
    def parse(cls, selector: str) -> LabelQuery:
        terms = []
        for part in _split(selector):
            terms.append(_parse_term(part))
        return cls(tuple(terms))


_KEY = r"[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?"
_SET = re.compile(rf"^(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<vals>[^)]*)\)$")
_EQ = re.compile(rf"^(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<val>[^,=!\s]*)$")
_EXISTS = re.compile(rf"^(?P<neg>!?)\s*(?P<key>{_KEY})$")


def _split(selector: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if cur or parts:
        parts.append("".join(cur).strip())
    if any(not p for p in parts):
        raise ValueError(f"label selector {selector!r}: empty term")
    return parts


def _parse_term(text: str) -> LabelTerm:
    if m := _SET.match(text):
        vals = tuple(v.strip() for v in m["vals"].split(",") if v.strip())
        return LabelTerm(m["key"], LabelOp.IN, vals, invert=m["op"] == "notin")
    if m := _EQ.match(text):
        return LabelTerm(m["key"], LabelOp.EQUAL, (m["val"],), invert=m["op"] == "!=")
    if m := _EXISTS.match(text):
        return LabelTerm(m["key"], LabelOp.EXISTS, invert=bool(m["neg"]))
    raise ValueError(
        f"label selector term {text!r}: expected key, !key, key=value, key!=value or key in (...)"
    )

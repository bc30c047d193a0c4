"""Which config fields are secret, and how they are hidden in diffs, reprs and messages.

A value is secret when any key on its path ends in ``secret``, ``token``, ``password``,
``passphrase``, ``key`` or ``credential(s)`` (case-insensitive): that covers ``cluster.secret``,
``machine.token``, ``machine.ca.key``, Talos's ``cluster.secretboxEncryptionSecret``,
``cluster.aescbcEncryptionSecret``, ``cluster.serviceAccount.key`` and the keys of every CA, as well as
secret-looking fields of documents we do not know. Every value in a ``ServiceConfig`` ``env`` is secret
too (credentials are usually passed to services through the environment).
"""

from __future__ import annotations

import copy
import difflib
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
REDACTED_OLD = "<redacted: old value>"
REDACTED_NEW = "<redacted: new value>"

_SECRET_KEY = re.compile(r"(secret|token|password|passphrase|key|credentials?)$", re.I)

PathT = tuple[str | int, ...]


def is_secret_path(kind: str, path: PathT) -> bool:
    """True when the value at ``path`` in a document of ``kind`` must never be shown."""
    if kind == "ServiceConfig" and len(path) >= 2 and path[0] == "env":
        return True
    return any(isinstance(t, str) and _SECRET_KEY.search(t) for t in path)


def redact(kind: str, doc: Any, marks: Mapping[PathT, str] | None = None, path: PathT = ()) -> Any:
    """A copy of ``doc`` with every secret scalar replaced by ``<redacted>`` (or its entry in ``marks``)."""
    if isinstance(doc, dict):
        return {k: redact(kind, v, marks, (*path, k)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [redact(kind, v, marks, (*path, i)) for i, v in enumerate(doc)]
    if doc is None or isinstance(doc, bool) or not is_secret_path(kind, path):
        return copy.deepcopy(doc)
    return (marks or {}).get(path, REDACTED)


def _leaves(doc: Any, path: PathT = ()) -> dict[PathT, Any]:
    out: dict[PathT, Any] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.update(_leaves(v, (*path, k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.update(_leaves(v, (*path, i)))
    else:
        out[path] = doc
    return out


def redacted_pair(kind: str, old: Any, new: Any) -> tuple[Any, Any]:
    """``(old, new)`` (the same document before and after a change) with secrets hidden.

    A secret that changed reads ``<redacted: old value>`` / ``<redacted: new value>``, so a diff shows
    that it changed without showing either value; an unchanged one reads ``<redacted>`` on both sides.
    """
    lo, ln = _leaves(old), _leaves(new)
    changed = {p for p in lo.keys() & ln.keys() if is_secret_path(kind, p) and lo[p] != ln[p]}
    return (
        redact(kind, old, dict.fromkeys(changed, REDACTED_OLD)),
        redact(kind, new, dict.fromkeys(changed, REDACTED_NEW)),
    )


# difflib's matcher is quadratic at worst (50,000 lines with every other one changed: 96 s). Up to
# this many line pairs (len(a) * len(b)) it runs on the whole texts; beyond, see _large_diff.
_DIFFLIB_WORK = 4_000_000
_GAP_WORK = 250_000  # line pairs of one gap between anchors handed to difflib
_TOTAL_WORK = 10_000_000  # line pairs handed to difflib by one _large_diff; later gaps are replacements


def unified_diff(old_text: str, new_text: str, old_name: str = "current", new_name: str = "new") -> str:
    """A unified diff, or ``No changes.`` when the texts are equal.

    Long texts take a bounded path (:func:`_large_diff`), so no input makes a diff slow.
    """
    a, b = old_text.splitlines(), new_text.splitlines()
    if len(a) * len(b) <= _DIFFLIB_WORK:
        lines = list(difflib.unified_diff(a, b, fromfile=old_name, tofile=new_name, lineterm=""))
    else:
        lines = _large_diff(a, b, old_name, new_name) if a != b else []
    return "\n".join(lines) + "\n" if lines else "No changes."


class _Opcodes(difflib.SequenceMatcher):
    """A SequenceMatcher with given opcodes (for its hunk grouping)."""

    def __init__(self, codes: list[tuple[str, int, int, int, int]]) -> None:
        super().__init__(None, [], [])
        self._codes = codes

    def get_opcodes(self) -> list[tuple[str, int, int, int, int]]:
        return self._codes


def _range(start: int, stop: int) -> str:  # difflib's _format_range_unified
    beginning, length = start + 1, stop - start
    if length == 1:
        return f"{beginning}"
    if not length:
        beginning -= 1
    return f"{beginning},{length}"


def _anchors(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The longest run of ``pairs`` (ascending in the first item) ascending in the second too."""
    tails: list[int] = []  # tails[k]: index in pairs of the smallest end of a run of length k+1
    prev = [-1] * len(pairs)
    for n, (_, j) in enumerate(pairs):
        k = _bisect(pairs, tails, j)
        if k:
            prev[n] = tails[k - 1]
        if k == len(tails):
            tails.append(n)
        else:
            tails[k] = n
    out: list[tuple[int, int]] = []
    n = tails[-1] if tails else -1
    while n >= 0:
        out.append(pairs[n])
        n = prev[n]
    return out[::-1]


def _bisect(pairs: list[tuple[int, int]], tails: list[int], j: int) -> int:
    lo, hi = 0, len(tails)
    while lo < hi:
        mid = (lo + hi) // 2
        if pairs[tails[mid]][1] < j:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _large_diff(a: list[str], b: list[str], old_name: str, new_name: str) -> list[str]:
    """A unified diff of long texts in O(n log n) plus bounded difflib work (a patience diff).

    The common head and tail are cut off; lines that occur once on each side are matched in order
    (the longest ascending run of them) and anchor the diff; between two anchors difflib runs when
    the gap is small (and the total budget lasts), else the gap is shown as replaced.
    """
    n, m = len(a), len(b)
    lo = 0
    while lo < n and lo < m and a[lo] == b[lo]:
        lo += 1
    hi_a, hi_b = n, m
    while hi_a > lo and hi_b > lo and a[hi_a - 1] == b[hi_b - 1]:
        hi_a, hi_b = hi_a - 1, hi_b - 1
    count_a, count_b = Counter(a[lo:hi_a]), Counter(b[lo:hi_b])
    where_b = {line: j for j, line in enumerate(b[lo:hi_b], lo) if count_b[line] == 1}
    pairs = [(i, where_b[x]) for i, x in enumerate(a[lo:hi_a], lo) if count_a[x] == 1 and x in where_b]
    codes: list[tuple[str, int, int, int, int]] = [("equal", 0, lo, 0, lo)] if lo else []
    budget = _TOTAL_WORK
    i, j = lo, lo
    for ai, bj in [*_anchors(pairs), (hi_a, hi_b)]:
        if ai > i and bj > j:
            work = (ai - i) * (bj - j)
            if work <= _GAP_WORK and work <= budget:
                budget -= work
                sm = difflib.SequenceMatcher(None, a[i:ai], b[j:bj])
                codes += [(t, x1 + i, x2 + i, y1 + j, y2 + j) for t, x1, x2, y1, y2 in sm.get_opcodes()]
            else:
                codes.append(("replace", i, ai, j, bj))
        elif ai > i:
            codes.append(("delete", i, ai, j, j))
        elif bj > j:
            codes.append(("insert", i, i, j, bj))
        if ai < hi_a:
            codes.append(("equal", ai, ai + 1, bj, bj + 1))
        i, j = ai + 1, bj + 1
    if hi_a < n:
        codes.append(("equal", hi_a, n, hi_b, m))
    merged: list[tuple[str, int, int, int, int]] = []
    for c in codes:
        if merged and c[0] == "equal" == merged[-1][0]:
            merged[-1] = ("equal", merged[-1][1], c[2], merged[-1][3], c[4])
        else:
            merged.append(c)
    out = [f"--- {old_name}", f"+++ {new_name}"]
    for group in _Opcodes(merged).get_grouped_opcodes(3):
        out.append(f"@@ -{_range(group[0][1], group[-1][2])} +{_range(group[0][3], group[-1][4])} @@")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                out += [" " + x for x in a[i1:i2]]
                continue
            if tag in ("replace", "delete"):
                out += ["-" + x for x in a[i1:i2]]
            if tag in ("replace", "insert"):
                out += ["+" + x for x in b[j1:j2]]
    return out


def secret_values(kind: str, doc: Any, path: PathT = ()) -> list[str]:
    """Every secret scalar of a document as text (for tests that prove nothing leaks)."""
    out: list[str] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += secret_values(kind, v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += secret_values(kind, v, (*path, i))
    elif doc is not None and not isinstance(doc, bool) and is_secret_path(kind, path):
        out.append(str(doc))
    return out

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


def unified_diff(old_text: str, new_text: str, old_name: str = "current", new_name: str = "new") -> str:
    """A unified diff, or ``No changes.`` when the texts are equal."""
    lines = list(
        difflib.unified_diff(
            old_text.splitlines(), new_text.splitlines(), fromfile=old_name, tofile=new_name, lineterm=""
        )
    )
    return "\n".join(lines) + "\n" if lines else "No changes."


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

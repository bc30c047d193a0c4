"""Config patches: strategic merge (Talos semantics) and RFC 6902 JSON patch, on a multi-document config.

Both apply all-or-nothing; errors (:class:`PatchError`) name the operation or patch document and the
path, never the values. The merge rules (replaced and keyed lists, ``$patch: delete``) and our JSON
patch extension for other documents: docs/design/config-patch.md.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from machined.config import documents as d
from machined.config.errors import ConfigValidationError, PatchError
from machined.config.yamlio import load_documents


@dataclass(frozen=True, slots=True)
class StrategicMergePatch:
    documents: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class JsonPatch:
    operations: tuple[dict[str, Any], ...]


Patch = StrategicMergePatch | JsonPatch

# --- list merge rules ------------------------------------------------------------------------------

_REPLACE = "replace"
_LIST_RULES: dict[tuple[str, tuple[str, ...]], str | tuple[str, ...]] = {
    (d.V1ALPHA1, ("machine", "network", "kubespan", "filters", "endpoints")): _REPLACE,
    (d.KUBESPAN_CONFIG, ("filters", "endpoints")): _REPLACE,
    (d.V1ALPHA1, ("cluster", "network", "podSubnets")): _REPLACE,
    (d.V1ALPHA1, ("cluster", "network", "serviceSubnets")): _REPLACE,
    (d.SERVICE_CONFIG, ("args",)): _REPLACE,
    (d.SERVICE_CONFIG, ("healthCheck", "exec")): _REPLACE,
    (d.V1ALPHA1, ("machine", "network", "interfaces")): ("interface", "deviceSelector"),
    (d.V1ALPHA1, ("machine", "network", "interfaces", "*", "vlans")): ("vlanId",),
}


def list_rule(kind: str, path: Sequence[str | int]) -> str | tuple[str, ...]:
    """``append``, ``replace`` or the key fields of a keyed list, for the list at ``path``."""
    pattern = tuple("*" if isinstance(p, int) else p for p in path)
    return _LIST_RULES.get((kind, pattern), "append")


# --- loading ---------------------------------------------------------------------------------------


def load_patch(text: str | bytes) -> Patch:
    """A patch from text: a YAML/JSON list of operations is a JSON patch, mappings a strategic merge."""
    docs = _load_json(text)
    if docs is None:
        try:
            docs = load_documents(text, "patch")
        except ConfigValidationError as e:
            raise PatchError(str(e.problems[0])) from None
    if not docs:
        raise PatchError("the patch is empty")
    if isinstance(docs[0], list):
        if len(docs) != 1:
            raise PatchError("a JSON patch is a single list of operations")
        return json_patch_of(docs[0])
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise PatchError("must be a mapping (a partial config document)", document=f"document {i + 1}")
    return StrategicMergePatch(tuple(docs))


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise PatchError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _load_json(text: str | bytes) -> list[Any] | None:
    """The patch as JSON when it is JSON (YAML 1.1 reads a few JSON escapes differently), else None."""
    stripped = text.lstrip()
    if not stripped or stripped[:1] not in ("[", "{", b"[", b"{"):
        return None
    try:
        return [json.loads(text, object_pairs_hook=_reject_duplicates)]
    except ValueError:
        return None


def json_patch_of(operations: Sequence[Any]) -> JsonPatch:
    """Check the shape of RFC 6902 operations (ops, required members, pointers)."""
    ops: list[dict[str, Any]] = []
    for i, op in enumerate(operations):
        if not isinstance(op, dict):
            raise PatchError("an operation must be a mapping", op_index=i)
        name = op.get("op")
        path = op.get("path")
        if name not in _MEMBERS:
            raise PatchError(
                f"unknown op (one of {', '.join(_MEMBERS)})",
                op_index=i,
                path=path if isinstance(path, str) else "",
            )
        if not isinstance(path, str):
            raise PatchError("path is required and must be a string", op_index=i, op=name)
        for member in _MEMBERS[name]:
            if member not in op:
                raise PatchError(f"{member!r} is required", op_index=i, op=name, path=path)
        try:
            parse_pointer(path)
            if "from" in _MEMBERS[name]:
                if not isinstance(op["from"], str):
                    raise _PointerError("'from' must be a string")
                parse_pointer(op["from"])
        except _PointerError as e:
            raise PatchError(str(e), op_index=i, op=name, path=path) from None
        doc = op.get("document", d.V1ALPHA1)
        if not isinstance(doc, str):
            raise PatchError("'document' must be a document label such as ServiceConfig[etcd]", op_index=i)
        ops.append(op)
    return JsonPatch(tuple(ops))


def _as_patch(p: Patch | str | bytes) -> Patch:
    return load_patch(p) if isinstance(p, str | bytes) else p


def apply_patches(
    docs: Sequence[dict[str, Any]], patches: Iterable[Patch | str | bytes]
) -> list[dict[str, Any]]:
    """Apply patches in order to (a copy of) the documents; nothing changes if one fails."""
    out = copy.deepcopy(list(docs))
    for p in patches:
        patch = _as_patch(p)
        out = (
            strategic_merge(out, patch) if isinstance(patch, StrategicMergePatch) else json_patch(out, patch)
        )
    return out


# --- strategic merge -------------------------------------------------------------------------------


class _Delete:
    pass


_DELETE = _Delete()


def _fmt(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _find(docs: Sequence[Any], key: tuple[str, str | None]) -> int | None:
    return next((i for i, doc in enumerate(docs) if d.doc_key(doc) == key), None)


def strategic_merge(docs: Sequence[dict[str, Any]], patch: StrategicMergePatch) -> list[dict[str, Any]]:
    out = copy.deepcopy(list(docs))
    for pi, pdoc in enumerate(patch.documents):
        key = d.doc_key(pdoc)
        where = f"document {pi + 1}"
        if key is None:
            raise PatchError("must have version: v1alpha1, or apiVersion and kind", document=where)
        label = d.label_for(*key)
        where = f"document {pi + 1} ({label})"
        idx = _find(out, key)
        directive = pdoc.get("$patch")
        if directive is not None and directive != "delete":
            raise PatchError("unsupported $patch (only delete)", document=where, path="$patch")
        if directive == "delete":
            if idx is None:
                raise PatchError("no such document to delete", document=where)
            del out[idx]
            continue
        if idx is None:
            new = _merge(_NOTHING, pdoc, key[0], (), where)
            assert isinstance(new, dict)
            if key[0] == d.V1ALPHA1 and "version" not in new:
                new = {"version": d.V1ALPHA1, **new}
            out.append(new)
        else:
            merged = _merge(out[idx], pdoc, key[0], (), where)
            assert isinstance(merged, dict)
            out[idx] = merged
    return out


class _Nothing:
    pass


_NOTHING = _Nothing()  # "no value to merge into"


def _merge(base: Any, patch: Any, kind: str, path: tuple[str | int, ...], where: str) -> Any:
    """Merge ``patch`` into ``base`` (``_NOTHING`` when absent); returns the result or ``_DELETE``."""
    if isinstance(patch, dict):
        directive = patch.get("$patch")
        if directive is not None:
            if directive != "delete":
                raise PatchError(
                    "unsupported $patch (only delete)", document=where, path=_fmt((*path, "$patch"))
                )
            return _DELETE
        out = dict(base) if isinstance(base, dict) else {}
        for k, v in patch.items():
            if v is None:  # null leaves a value alone (use $patch: delete to remove it)
                continue
            merged = _merge(out.get(k, _NOTHING), v, kind, (*path, k), where)
            if isinstance(merged, _Delete):
                out.pop(k, None)
            else:
                out[k] = merged
        return out
    if isinstance(patch, list):
        rule = list_rule(kind, path)
        if isinstance(rule, tuple):
            return _merge_keyed(base if isinstance(base, list) else [], patch, rule, kind, path, where)
        for i, item in enumerate(patch):
            if isinstance(item, dict) and "$patch" in item:
                raise PatchError(
                    "$patch in a list item needs a list whose items are matched by a key "
                    "(such as machine.network.interfaces by interface)",
                    document=where,
                    path=_fmt((*path, i)),
                )
        start = len(base) if isinstance(base, list) and rule != _REPLACE else 0
        items = [_merge(_NOTHING, item, kind, (*path, start + i), where) for i, item in enumerate(patch)]
        items = [v for v in items if not isinstance(v, _Delete)]
        if rule == _REPLACE or not isinstance(base, list):
            return items
        return [*base, *items]
    return copy.deepcopy(patch)


def _merge_keyed(
    base: list[Any],
    patch: list[Any],
    keys: tuple[str, ...],
    kind: str,
    path: tuple[str | int, ...],
    where: str,
) -> list[Any]:
    out = list(base)
    for i, item in enumerate(patch):
        key = next((k for k in keys if isinstance(item, dict) and item.get(k) is not None), None)
        if key is None:
            raise PatchError(
                f"each item must have one of {', '.join(keys)} (items of this list are matched by it)",
                document=where,
                path=_fmt((*path, i)),
            )
        match = next((j for j, b in enumerate(out) if isinstance(b, dict) and b.get(key) == item[key]), None)
        merged = _merge(out[match] if match is not None else _NOTHING, item, kind, (*path, i), where)
        if match is None:
            if not isinstance(merged, _Delete):
                out.append(merged)
        elif isinstance(merged, _Delete):
            del out[match]
        else:
            out[match] = merged
    return out


# --- JSON patch ------------------------------------------------------------------------------------

_MEMBERS: dict[str, tuple[str, ...]] = {
    "add": ("value",),
    "remove": (),
    "replace": ("value",),
    "move": ("from",),
    "copy": ("from",),
    "test": ("value",),
}
_INDEX = re.compile(r"0|[1-9][0-9]*")
_BAD_ESCAPE = re.compile(r"~(?![01])")


class _PointerError(ValueError):
    pass


def parse_pointer(pointer: str) -> list[str]:
    """RFC 6901 reference tokens of ``pointer`` (``""`` is the whole document)."""
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise _PointerError("a JSON pointer must be empty or start with '/'")
    tokens = pointer[1:].split("/")
    for t in tokens:
        if _BAD_ESCAPE.search(t):
            raise _PointerError("'~' must be followed by 0 or 1 in a JSON pointer")
    return [t.replace("~1", "/").replace("~0", "~") for t in tokens]


def format_pointer(tokens: Iterable[str | int]) -> str:
    """The JSON pointer of reference tokens (inverse of :func:`parse_pointer`)."""
    return "".join("/" + str(t).replace("~", "~0").replace("/", "~1") for t in tokens)


def _index(container: list[Any], token: str, *, allow_end: bool) -> int:
    if token == "-":
        if allow_end:
            return len(container)
        raise _PointerError("'-' (past the end of the list) names no element")
    if not _INDEX.fullmatch(token):
        raise _PointerError(f"{token!r} is not a list index")
    i = int(token)
    if i > len(container) or (i == len(container) and not allow_end):
        raise _PointerError(f"list index {i} is out of range (length {len(container)})")
    return i


def _get(doc: Any, tokens: Sequence[str]) -> Any:
    node = doc
    for n, t in enumerate(tokens):
        if isinstance(node, dict):
            if t not in node:
                raise _PointerError(f"{format_pointer(tokens[: n + 1])} does not exist")
            node = node[t]
        elif isinstance(node, list):
            node = node[_index(node, t, allow_end=False)]
        else:
            raise _PointerError(f"{format_pointer(tokens[:n]) or '/'} is not a mapping or list")
    return node


def _add(doc: Any, tokens: Sequence[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _get(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, allow_end=True), value)
    else:
        raise _PointerError(f"{format_pointer(tokens[:-1]) or '/'} is not a mapping or list")
    return doc


def _remove(doc: Any, tokens: Sequence[str]) -> tuple[Any, Any]:
    if not tokens:
        raise _PointerError(
            "cannot remove a whole document (use a strategic merge patch with $patch: delete)"
        )
    parent = _get(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _PointerError(f"{format_pointer(tokens)} does not exist")
        return doc, parent.pop(last)
    if isinstance(parent, list):
        return doc, parent.pop(_index(parent, last, allow_end=False))
    raise _PointerError(f"{format_pointer(tokens[:-1]) or '/'} is not a mapping or list")


def _replace(doc: Any, tokens: Sequence[str], value: Any) -> Any:
    if not tokens:
        return value
    _get(doc, tokens)  # must exist
    parent = _get(doc, tokens[:-1])
    if isinstance(parent, dict):
        parent[tokens[-1]] = value
    else:
        parent[_index(parent, tokens[-1], allow_end=False)] = value
    return doc


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: 1 == 1.0, but true != 1; mappings ignore order, lists do not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def apply_json_patch(doc: Any, operations: Sequence[dict[str, Any]], *, document: str = "") -> Any:
    """Apply RFC 6902 operations to one document (a copy); returns the result."""
    out = copy.deepcopy(doc)
    for i, op in enumerate(operations):
        out = _apply_op(out, op, i, document)
    return out


def _apply_op(doc: Any, op: dict[str, Any], i: int, document: str) -> Any:
    name = op.get("op", "")
    path = op.get("path", "")
    try:
        tokens = parse_pointer(path)
        if name == "add":
            return _add(doc, tokens, copy.deepcopy(op["value"]))
        if name == "remove":
            return _remove(doc, tokens)[0]
        if name == "replace":
            return _replace(doc, tokens, copy.deepcopy(op["value"]))
        if name in ("move", "copy"):
            src = parse_pointer(op["from"])
            if name == "move":
                if src == tokens:
                    _get(doc, src)
                    return doc
                if tokens[: len(src)] == src:
                    raise _PointerError("cannot move a value into one of its own children")
                doc, value = _remove(doc, src)
            else:
                value = copy.deepcopy(_get(doc, src))
            return _add(doc, tokens, value)
        if name == "test":
            if not json_equal(_get(doc, tokens), op["value"]):
                raise _PointerError("test failed: the value differs")
            return doc
        raise _PointerError("unknown op")
    except _PointerError as e:
        raise PatchError(str(e), op_index=i, op=name, path=path, document=document) from None
    except KeyError as e:
        raise PatchError(
            f"{e.args[0]!r} is required", op_index=i, op=name, path=path, document=document
        ) from None


def json_patch(docs: Sequence[dict[str, Any]], patch: JsonPatch) -> list[dict[str, Any]]:
    out = copy.deepcopy(list(docs))
    for i, op in enumerate(json_patch_of(patch.operations).operations):
        label = op.get("document", d.V1ALPHA1)
        idx = next(
            (
                j
                for j, doc in enumerate(out)
                if (k := d.doc_key(doc)) is not None and d.label_for(*k) == label
            ),
            None,
        )
        if idx is None:
            raise PatchError(f"the config has no {label} document", op_index=i, op=op["op"], path=op["path"])
        out[idx] = _apply_op(out[idx], op, i, label if label != d.V1ALPHA1 else "")
    return out

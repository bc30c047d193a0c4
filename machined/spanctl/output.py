"""Rendering: talosctl's tables (UPPERCASE headers, NODE first, 3-space padding) and resources as
``table``, ``yaml`` (``---`` documents with ``node:``, ``metadata:``, ``spec:``), ``json`` (one
indented object per resource) or ``jsonpath=TEMPLATE`` (see :mod:`.jsonpath`). In watch mode
(``get -w``) tables get a ``*`` column right after NODE, as talosctl's (``+`` created, ``-``
destroyed, blank updated), YAML/JSON/JSONPath an ``event`` field, and output is held back until the
watch is bootstrapped, then flushed after every event.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import IO, Any

import yaml
from google.protobuf import timestamp_pb2

from machined.state.definitions import PrintColumn, ResourceDefinition
from spanapi.talos.cosi import resource_pb2, state_pb2

from .jsonpath import JSONPathError, parse_format

PAD = 3
FORMATS = ("table", "yaml", "json", "jsonpath=TEMPLATE")
BASE_HEADERS = ("NODE", "NAMESPACE", "TYPE", "ID", "VERSION")

EVENT_NAMES = {
    state_pb2.CREATED: "created",
    state_pb2.UPDATED: "updated",
    state_pb2.DESTROYED: "destroyed",
}
EVENT_MARK = {state_pb2.CREATED: "+", state_pb2.UPDATED: " ", state_pb2.DESTROYED: "-"}


def widths(rows: Sequence[Sequence[str]], minimum: Sequence[int] = ()) -> list[int]:
    n = max((len(r) for r in rows), default=0)
    w = [0] * n
    for i, m in enumerate(minimum[:n]):
        w[i] = m
    for r in rows:
        for i, c in enumerate(r):
            w[i] = max(w[i], len(c))
    return w


def format_row(row: Sequence[str], w: Sequence[int]) -> str:
    cells = [c.ljust(w[i] + PAD) if i < len(row) - 1 else c for i, c in enumerate(row)]
    return "".join(cells).rstrip()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A tabwriter-style table (columns padded by 3 spaces), headers upper-cased."""
    all_rows = [[h.upper() for h in headers], *[[str(c) for c in r] for r in rows]]
    w = widths(all_rows)
    return "\n".join(format_row(r, w) for r in all_rows) + "\n"


def timestamp(ts: timestamp_pb2.Timestamp) -> str:
    if ts.seconds == 0 and ts.nanos == 0:
        return ""
    return ts.ToJsonString()


def definition_from_spec(spec: Any) -> ResourceDefinition:
    """A :class:`ResourceDefinition` from the spec of a ``ResourceDefinitions.meta.cosi.dev`` resource."""
    cols = tuple(PrintColumn(c["name"], c["jsonPath"]) for c in spec.get("printColumns") or ())
    return ResourceDefinition(
        type=spec["type"],
        default_namespace=spec.get("defaultNamespace") or "",
        singular=spec.get("singular") or "",
        aliases=tuple(spec.get("allAliases") or spec.get("aliases") or ()),
        print_columns=cols,
        sensitive=spec.get("sensitivity") == "sensitive",
    )


def spec_data(res: resource_pb2.Resource) -> Any:
    text = res.spec.yaml_spec
    if not text:
        return None
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return text
    if len(docs) == 1:
        return docs[0]
    return docs


def metadata_data(md: resource_pb2.Metadata) -> dict[str, Any]:
    out: dict[str, Any] = {
        "namespace": md.namespace,
        "type": md.type,
        "id": md.id,
        "version": int(md.version) if md.version.isdigit() else md.version,
        "owner": md.owner,
        "phase": md.phase,
        "created": timestamp(md.created),
        "updated": timestamp(md.updated),
    }
    if md.labels:
        out["labels"] = dict(sorted(md.labels.items()))
    if md.annotations:
        out["annotations"] = dict(sorted(md.annotations.items()))
    if md.finalizers:
        out["finalizers"] = list(md.finalizers)
    return out


def resource_data(node: str, res: resource_pb2.Resource, event: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"node": node}
    if event is not None:
        out["event"] = EVENT_NAMES.get(event, state_pb2.EventType.Name(event).lower())
    out["metadata"] = metadata_data(res.metadata)
    out["spec"] = spec_data(res)
    return out


def display_type(type_: str) -> str:
    return type_.split(".", 1)[0]


def check_format(fmt: str) -> None:
    """Raise ValueError naming the problem when ``fmt`` is not an output format of ``get``."""
    try:
        template = parse_format(fmt)
    except JSONPathError as e:
        raise ValueError(f"output format {fmt!r}: {e}") from None
    if template is None and fmt not in FORMATS:
        raise ValueError(f"output format {fmt!r}: must be one of {', '.join(FORMATS)}")


class ResourceWriter:
    """Writes resources in one format; ``watch`` adds the ``*`` column / ``event`` field.

    Rows are held until :meth:`flush` (called by the command after the listing, or after each
    BOOTSTRAPPED and each later event when watching). With ``jsonpath=``, :meth:`add` raises
    :class:`JSONPathError` for a resource the template does not fit (nothing is written for it)."""

    def __init__(
        self, out: IO[str], fmt: str, definition: ResourceDefinition | None, *, watch: bool = False
    ) -> None:
        check_format(fmt)
        self.template = parse_format(fmt)
        self.out = out
        self.fmt = "jsonpath" if self.template is not None else fmt
        self.defn = definition
        self.watch = watch
        self._rows: list[list[str]] = []
        self._widths: list[int] = []
        self._header_done = False

    def headers(self) -> list[str]:
        cols = [c.name.upper() for c in self.defn.print_columns] if self.defn else []
        base = list(BASE_HEADERS)
        if self.watch:
            base.insert(1, "*")
        return base + cols

    def row(self, node: str, res: resource_pb2.Resource, event: int | None = None) -> list[str]:
        md = res.metadata
        cells = [node, md.namespace, display_type(md.type), md.id, md.version]
        if self.defn is not None:
            cells += self.defn.columns(spec_data(res))
        if self.watch:
            cells.insert(1, EVENT_MARK.get(event, " ") if event is not None else " ")
        return cells

    def add(self, node: str, res: resource_pb2.Resource, event: int | None = None) -> None:
        if self.fmt == "table":
            self._rows.append(self.row(node, res, event))
            return
        data = resource_data(node, res, event if self.watch else None)
        if self.template is not None:
            self.out.write(self.template.render(data))
        elif self.fmt == "yaml":
            self.out.write("---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        else:
            self.out.write(json.dumps(data, indent=4, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if self.fmt == "table":
            rows = self._rows
            if not self._header_done:
                rows = [self.headers(), *rows]
            self._widths = widths(rows, self._widths)
            for r in rows:
                self.out.write(format_row(r, self._widths) + "\n")
            self._header_done = True
            self._rows = []
        self.out.flush()

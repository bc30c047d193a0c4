"""Resources: metadata plus a spec.

A resource is identified by ``(namespace, type, id)``. Its metadata carries
the COSI fields (version, owner, phase, timestamps, labels, annotations,
finalizers); its spec is a plain ``dict`` or a dataclass. The spec is rendered
to YAML for the API's ``yaml_spec``: dict keys as they are, dataclass fields in
camelCase (``receive_bytes`` -> ``receiveBytes``) unless a field carries
``metadata={"yaml": "name"}``; a spec with a ``to_data()`` method renders
whatever that returns.

Resources handed out by :class:`~machined.state.State` are copies (``get``,
``list``, ``modify``) or shared read-only snapshots (watch events); see the
State docstring.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import enum
import ipaddress
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

import yaml

_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class Phase(enum.StrEnum):
    RUNNING = "running"
    TEARING_DOWN = "tearingDown"


_IMMUTABLE = frozenset(
    {
        str,
        int,
        float,
        bool,
        bytes,
        type(None),
        datetime,
        date,
        ipaddress.IPv4Address,
        ipaddress.IPv6Address,
        ipaddress.IPv4Network,
        ipaddress.IPv6Network,
        ipaddress.IPv4Interface,
        ipaddress.IPv6Interface,
        frozenset,
    }
)


def copy_value(value: Any) -> Any:
    """Deep-copy a spec value; fast for JSON-like data, ``copy.deepcopy`` for anything else."""
    t = type(value)
    if t in _IMMUTABLE or isinstance(value, enum.Enum):
        return value
    imm = _IMMUTABLE
    if t is dict:  # scalars inline: most spec values are, and a call per value costs more than the copy
        return {k: v if type(v) in imm else copy_value(v) for k, v in value.items()}
    if t is list:
        return [v if type(v) in imm else copy_value(v) for v in value]
    if t is tuple:
        return tuple(copy_value(v) for v in value)
    return copy.deepcopy(value)


class Metadata:
    """Resource metadata. ``version`` is 0 until the state stores the resource, then 1, 2, ..."""

    __slots__ = (
        "annotations",
        "created",
        "finalizers",
        "id",
        "labels",
        "namespace",
        "owner",
        "phase",
        "type",
        "updated",
        "version",
    )

    def __init__(
        self,
        namespace: str,
        type: str,
        id: str,
        *,
        version: int = 0,
        owner: str = "",
        phase: Phase = Phase.RUNNING,
        created: datetime | None = None,
        updated: datetime | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        finalizers: list[str] | tuple[str, ...] | None = None,
    ) -> None:
        self.namespace = namespace
        self.type = type
        self.id = id
        self.version = version
        self.owner = owner
        self.phase = phase
        self.created = created
        self.updated = updated
        self.labels: dict[str, str] = dict(labels) if labels else {}
        self.annotations: dict[str, str] = dict(annotations) if annotations else {}
        self.finalizers: list[str] = list(finalizers) if finalizers else []

    def copy(self) -> Metadata:
        m = Metadata.__new__(Metadata)
        m.namespace = self.namespace
        m.type = self.type
        m.id = self.id
        m.version = self.version
        m.owner = self.owner
        m.phase = self.phase
        m.created = self.created
        m.updated = self.updated
        m.labels = dict(self.labels)
        m.annotations = dict(self.annotations)
        m.finalizers = list(self.finalizers)
        return m

    def to_data(self) -> dict[str, Any]:
        """The metadata as talosctl's YAML output shows it (version as a decimal string)."""
        out: dict[str, Any] = {
            "namespace": self.namespace,
            "type": self.type,
            "id": self.id,
            "version": str(self.version),
            "owner": self.owner,
            "phase": str(self.phase),
            "created": _timestamp(self.created),
            "updated": _timestamp(self.updated),
        }
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.finalizers:
            out["finalizers"] = list(self.finalizers)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Metadata):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Metadata({self.namespace}/{self.type}/{self.id} v{self.version} "
            f"owner={self.owner!r} phase={self.phase})"
        )


class Resource:
    """Metadata plus spec."""

    __slots__ = ("metadata", "spec")

    def __init__(self, metadata: Metadata, spec: Any = None) -> None:
        self.metadata = metadata
        self.spec = {} if spec is None else spec

    @classmethod
    def new(
        cls,
        namespace: str,
        type: str,
        id: str,
        spec: Any = None,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Resource:
        return cls(Metadata(namespace, type, id, labels=labels, annotations=annotations), spec)

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def type(self) -> str:
        return self.metadata.type

    @property
    def id(self) -> str:
        return self.metadata.id

    @property
    def version(self) -> int:
        return self.metadata.version

    def copy(self) -> Resource:
        """An independent deep copy (metadata and spec)."""
        return Resource(self.metadata.copy(), copy_value(self.spec))

    def spec_data(self) -> Any:
        """The spec as plain YAML-able data (what ``yaml_spec`` and print columns see)."""
        return to_data(self.spec)

    @property
    def yaml_spec(self) -> str:
        return dump_yaml(self.spec_data())

    def to_yaml(self) -> str:
        """``metadata:`` and ``spec:`` as one YAML document (talosctl ``-o yaml`` without ``node:``)."""
        return dump_yaml({"metadata": self.metadata.to_data(), "spec": self.spec_data()})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Resource):
            return NotImplemented
        return self.metadata == other.metadata and self.spec == other.spec

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Resource({self.metadata!r}, spec={self.spec!r})"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _timestamp(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat().replace("+00:00", "Z")


def to_data(value: Any) -> Any:
    """Convert a spec (or part of one) to plain data: dict/list/str/int/float/bool/None."""
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, enum.Enum):
            return to_data(value.value)
        return value
    if isinstance(value, enum.Enum):
        return to_data(value.value)
    to = getattr(value, "to_data", None)
    if callable(to) and not isinstance(value, type):
        return to_data(to())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.metadata.get("yaml", _camel(f.name)): to_data(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(k): to_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_data(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(to_data(v) for v in value)
    if isinstance(value, datetime):
        return _timestamp(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)  # ip addresses, networks, dates, paths ...


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)

"""The client config, in talosconfig's format::

    context: default
    contexts:
      default:
        endpoints: [192.0.2.10]        # apids dialled (the first one is used), or unix:///path
        nodes: [192.0.2.10, 192.0.2.11] # default targets
        ca: <base64 of the CA PEM>
        crt: <base64 of the client certificate PEM>
        key: <base64 of the client key PEM>

Lookup order: ``--config``, ``$SPANCTL_CONFIG``, ``~/.spanctl/config``. Written 0600, atomically.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spanutil.fsutil import write_atomic

ENV = "SPANCTL_CONFIG"
DEFAULT_PATH = Path("~/.spanctl/config")


class ConfigError(ValueError):
    pass


def default_path(flag: str | os.PathLike[str] | None = None) -> Path:
    if flag:
        return Path(flag).expanduser()
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    return DEFAULT_PATH.expanduser()


def _strs(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: must be a list of strings")
    return list(value)


def _b64(value: Any, where: str) -> bytes:
    if value in (None, ""):
        return b""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: not valid base64") from None


@dataclass
class Context:
    endpoints: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    ca: bytes = b""
    crt: bytes = b""
    key: bytes = b""

    @classmethod
    def from_data(cls, data: Any, name: str) -> Context:
        where = f"contexts.{name}"
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: must be a mapping")
        return cls(
            endpoints=_strs(data.get("endpoints"), f"{where}.endpoints"),
            nodes=_strs(data.get("nodes"), f"{where}.nodes"),
            ca=_b64(data.get("ca"), f"{where}.ca"),
            crt=_b64(data.get("crt"), f"{where}.crt"),
            key=_b64(data.get("key"), f"{where}.key"),
        )

    def to_data(self) -> dict[str, Any]:
        out: dict[str, Any] = {"endpoints": list(self.endpoints)}
        if self.nodes:
            out["nodes"] = list(self.nodes)
        for k in ("ca", "crt", "key"):
            v: bytes = getattr(self, k)
            if v:
                out[k] = base64.b64encode(v).decode()
        return out


@dataclass
class ClientConfig:
    context: str = ""
    contexts: dict[str, Context] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | bytes) -> ClientConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"not valid YAML: {e}") from None
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ConfigError("the client config must be a mapping")
        ctx = data.get("context") or ""
        if not isinstance(ctx, str):
            raise ConfigError("context: must be a string")
        raw = data.get("contexts") or {}
        if not isinstance(raw, dict):
            raise ConfigError("contexts: must be a mapping of name to context")
        contexts = {str(k): Context.from_data(v, str(k)) for k, v in raw.items()}
        if ctx and ctx not in contexts:
            raise ConfigError(f'context "{ctx}" is not defined in contexts')
        return cls(ctx, contexts)

    @classmethod
    def load(cls, path: Path, *, missing_ok: bool = True) -> ClientConfig:
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            if missing_ok:
                return cls()
            raise ConfigError(f"client config {path} does not exist") from None
        except OSError as e:
            raise ConfigError(f"cannot read client config {path}: {e.strerror}") from None
        try:
            return cls.parse(text)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def current(self, name: str | None = None) -> tuple[str, Context]:
        """The context named ``name`` (or the config's current one); an empty one when there is none."""
        name = name or self.context
        if not name:
            return "", Context()
        if name not in self.contexts:
            raise ConfigError(f'context "{name}" is not defined')
        return name, self.contexts[name]

    def to_yaml(self) -> str:
        data = {"context": self.context, "contexts": {k: v.to_data() for k, v in self.contexts.items()}}
        return yaml.safe_dump(data, sort_keys=False)

    def merge(self, other: ClientConfig) -> str:
        """Add ``other``'s contexts (renamed ``name-1``, ... on clashes); returns the new current name."""
        current = other.context
        for name, ctx in other.contexts.items():
            new = name
            i = 1
            while new in self.contexts:
                new = f"{name}-{i}"
                i += 1
            self.contexts[new] = ctx
            if name == other.context:
                current = new
        self.context = current
        return current


def write_private(path: Path, data: str | bytes) -> None:
    """Write ``data`` atomically with mode 0600 (``spanutil.fsutil.write_atomic``), parents 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data, 0o600)

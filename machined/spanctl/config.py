"""The client config, in talosconfig's format::

    context: default
    contexts:
      default:
        endpoints: [192.0.2.10]        # apids dialled (the first one is used), or unix:///path
        nodes: [192.0.2.10, 192.0.2.11] # default targets
        ca: <base64 of the CA PEM>
        crt: <base64 of the client certificate PEM>
        key: <base64 of the client key PEM>
        cluster: <name>                 # optional: sent as "context" metadata (talosctl's -c/--cluster)

Other keys of a context (talosctl's ``auth``, ``proxy-url``, ...) are kept as they are when we rewrite
the file. Lookup (:func:`default_path`): ours first, then talosctl's. Written 0600, atomically.
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
TALOS_ENV = "TALOSCONFIG"  # talosctl's variable
TALOS_HOME_ENV = "TALOS_HOME"  # talosctl's directory override (used when absolute), else ~/.talos
TALOS_DEFAULT_PATH = Path("~/.talos/config")
CONTEXT_KEYS = ("endpoints", "nodes", "ca", "crt", "key", "cluster")


class ConfigError(ValueError):
    pass


def talos_default_path() -> Path:
    """talosctl's own file: ``$TALOS_HOME/config`` when that is an absolute path, else ``~/.talos/config``."""
    home = os.environ.get(TALOS_HOME_ENV)
    if home and os.path.isabs(home):
        return Path(home) / "config"
    return TALOS_DEFAULT_PATH.expanduser()


def default_path(flag: str | os.PathLike[str] | None = None) -> Path:
    """The client config to read and write, ours before talosctl's:

    1. ``--config``/``--talosconfig``; 2. ``$SPANCTL_CONFIG``; 3. ``~/.spanctl/config`` if it exists;
    4. ``$TALOSCONFIG``; 5. ``~/.talos/config`` (``$TALOS_HOME/config``) if it exists; 6. otherwise
    ``~/.spanctl/config`` (created by the first write). A variable that is set is used whether or not its
    file exists (a test or script that sets one is never handed another file)."""
    if flag:
        return Path(flag).expanduser()
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    ours = DEFAULT_PATH.expanduser()
    if ours.exists():
        return ours
    talos_env = os.environ.get(TALOS_ENV)
    if talos_env:
        return Path(talos_env).expanduser()
    talos = talos_default_path()
    if talos.exists():
        return talos
    return ours


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
    key: bytes = field(default=b"", repr=False)
    cluster: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys we do not use, kept as read

    @classmethod
    def from_data(cls, data: Any, name: str) -> Context:
        where = f"contexts.{name}"
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: must be a mapping")
        cluster = data.get("cluster") or ""
        if not isinstance(cluster, str):
            raise ConfigError(f"{where}.cluster: must be a string")
        return cls(
            endpoints=_strs(data.get("endpoints"), f"{where}.endpoints"),
            nodes=_strs(data.get("nodes"), f"{where}.nodes"),
            ca=_b64(data.get("ca"), f"{where}.ca"),
            crt=_b64(data.get("crt"), f"{where}.crt"),
            key=_b64(data.get("key"), f"{where}.key"),
            cluster=cluster,
            extra={str(k): v for k, v in data.items() if k not in CONTEXT_KEYS},
        )

    def to_data(self) -> dict[str, Any]:
        out: dict[str, Any] = {"endpoints": list(self.endpoints)}
        if self.nodes:
            out["nodes"] = list(self.nodes)
        for k in ("ca", "crt", "key"):
            v: bytes = getattr(self, k)
            if v:
                out[k] = base64.b64encode(v).decode()
        if self.cluster:
            out["cluster"] = self.cluster
        out.update(self.extra)
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

"""Secrets and config generation (what ``spanctl gen secrets`` / ``spanctl gen config`` call).

* :func:`gen_secrets` → :class:`Secrets`: cluster id and secret (32 random bytes each, base64
  StdEncoding), the OS CA (ECDSA P-256, self-signed) and the machine token (``[a-z0-9]{6}.[a-z0-9]{16}``).
  :meth:`Secrets.to_yaml` writes a bundle in ``talosctl gen secrets``'s layout (``cluster``,
  ``trustdinfo``, ``certs.os``), and :meth:`Secrets.from_yaml` reads ours or Talos's (extra sections
  are ignored; Talos's Ed25519 OS CA under its ``ED25519 PRIVATE KEY`` label loads and is served by apid;
  :attr:`Secrets.warnings` names a CA apid cannot use: a key that is not the certificate's, or a type
  other than ECDSA and Ed25519).
* :func:`gen_config` → :class:`GeneratedConfig`: ``controlplane.yaml`` (CA crt + key),
  ``worker.yaml`` (CA crt only) — multi-document machine configs that :meth:`MachineConfig.parse`
  accepts — and a client config in talosconfig's format whose certificate is signed by the CA with
  the requested roles (default ``os:admin``). :meth:`GeneratedConfig.write` writes all three 0600,
  atomically (each holds a secret). As ``talosctl gen config NAME ENDPOINT``, the second argument is
  the Kubernetes API endpoint (``cluster.controlPlane.endpoint``); the discovery services are given
  separately, one ``DiscoveryServiceConfig`` document each (Talos 1.14's layout).
"""

from __future__ import annotations

import base64
import ipaddress
import secrets as _random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from machined import pki
from machined.config import MachineConfig, apply_patches
from machined.config.patch import Patch
from machined.config.yamlio import dump_documents, load_documents

ADMIN_ROLES = ("os:admin",)
TOKEN_ALPHABET = string.ascii_lowercase + string.digits
CONTROLPLANE_FILE = "controlplane.yaml"
WORKER_FILE = "worker.yaml"
TALOSCONFIG_FILE = "talosconfig"
DEFAULT_DISCOVERY_ENDPOINT = "https://discovery.talos.dev/"  # Talos's default (constants.go)
KUBERNETES_API_PORT = 6443  # Talos's DefaultControlPlanePort: what "try:" suggestions add


class GenError(ValueError):
    """Bad input to generation: the message names the field."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise GenError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise GenError(f"{what} must be base64") from None


def gen_token() -> str:
    """A machine token: ``[a-z0-9]{6}.[a-z0-9]{16}`` (Talos's ``trustdinfo.token``)."""
    pick = lambda n: "".join(_random.choice(TOKEN_ALPHABET) for _ in range(n))  # noqa: E731
    return f"{pick(6)}.{pick(16)}"


@dataclass(frozen=True, slots=True)
class Secrets:
    cluster_id: str
    cluster_secret: str = field(repr=False)
    token: str = field(repr=False)
    os_ca: pki.KeyPair

    @property
    def warnings(self) -> tuple[str, ...]:
        try:
            pki.check_tls_usable(self.os_ca.crt, self.os_ca.key)
        except pki.PKIError as e:
            return (str(e),)
        return ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster": {"id": self.cluster_id, "secret": self.cluster_secret},
            "trustdinfo": {"token": self.token},
            "certs": {"os": {"crt": _b64(self.os_ca.crt), "key": _b64(self.os_ca.key)}},
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str | bytes) -> Secrets:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise GenError(f"secrets bundle is not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(doc, dict):
            raise GenError("secrets bundle must be a mapping")

        def get(*path: str) -> Any:
            cur: Any = doc
            for p in path:
                if not isinstance(cur, dict) or p not in cur:
                    raise GenError(f"secrets bundle: {'.'.join(path)} is required")
                cur = cur[p]
            return cur

        cluster_id, secret, token = get("cluster", "id"), get("cluster", "secret"), get("trustdinfo", "token")
        for name, v in (("cluster.id", cluster_id), ("cluster.secret", secret), ("trustdinfo.token", token)):
            if not isinstance(v, str) or not v:
                raise GenError(f"secrets bundle: {name} must be a non-empty string")
        if len(_unb64(secret, "secrets bundle: cluster.secret")) != 32:
            raise GenError("secrets bundle: cluster.secret must be base64 of 32 bytes")
        crt = _unb64(get("certs", "os", "crt"), "secrets bundle: certs.os.crt")
        key = _unb64(get("certs", "os", "key"), "secrets bundle: certs.os.key")
        try:
            pki.load_certificate(crt)
        except pki.PKIError:
            raise GenError("secrets bundle: certs.os.crt must be base64 of a PEM certificate") from None
        try:
            pki.load_private_key(key)
        except pki.PKIError:
            raise GenError("secrets bundle: certs.os.key must be base64 of a PEM private key") from None
        return cls(cluster_id, secret, token, pki.KeyPair(crt, key))

    def write(self, path: Path | str) -> None:
        pki.write_secret_file(path, self.to_yaml())


def gen_secrets() -> Secrets:
    return Secrets(
        cluster_id=_b64(_random.token_bytes(32)),
        cluster_secret=_b64(_random.token_bytes(32)),
        token=gen_token(),
        os_ca=pki.generate_ca(),
    )


@dataclass(frozen=True, slots=True)
class GeneratedConfig:
    controlplane: str = field(repr=False)
    worker: str = field(repr=False)
    talosconfig: str = field(repr=False)

    def write(self, directory: Path | str, *, overwrite: bool = False) -> list[Path]:
        """Write the three files (0600, atomic); refuses to replace existing files unless ``overwrite``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = [
            (d / CONTROLPLANE_FILE, self.controlplane),
            (d / WORKER_FILE, self.worker),
            (d / TALOSCONFIG_FILE, self.talosconfig),
        ]
        if not overwrite:
            existing = [str(p) for p, _ in files if p.exists()]
            if existing:
                raise GenError(f"refusing to overwrite {', '.join(existing)} (use overwrite)")
        for p, text in files:
            pki.write_secret_file(p, text)
        return [p for p, _ in files]


def _suggest_endpoint(text: str) -> str:
    """``text`` as an https URL with a port (6443 when it has none), for a "try:" hint."""
    rest = text.split("://", 1)[1] if "://" in text else text
    host = rest.split("/", 1)[0]
    try:
        has_port = urlsplit("//" + host).port is not None
    except ValueError:
        has_port = False
    return f"https://{host}" if has_port else f"https://{host}:{KUBERNETES_API_PORT}"


def check_cluster_endpoint(text: str) -> None:
    """Talos's checks of the ``gen config`` ENDPOINT (the Kubernetes API URL): an ``https://`` URL
    with a valid host and, if given, a valid port; a path is allowed. Raises :class:`GenError` with a
    "try:" suggestion, as talosctl does."""
    if not isinstance(text, str) or not text.strip():
        raise GenError("cluster endpoint must be a URL such as https://192.0.2.1:6443")
    if "://" not in text:
        missing = "scheme" if ":" in text.rsplit("]", 1)[-1] else "scheme and port"
        raise GenError(f"no {missing} specified for the cluster endpoint URL; try: {_suggest_endpoint(text)}")
    if not text.startswith("https://"):
        raise GenError(
            f"the cluster endpoint URL should have scheme https://; try: {_suggest_endpoint(text)}"
        )
    try:
        u = urlsplit(text)
        u.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise GenError("cluster endpoint: not a valid URL (bad host or port)") from None
    if u.username is not None or u.password is not None:
        raise GenError("cluster endpoint: must not contain credentials")
    host = u.hostname or ""
    if not host or not _valid_host(host):
        raise GenError("cluster endpoint: must name a host (an IP address or a DNS name)")


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
        for label in labels
    )


def discovery_documents(endpoints: Sequence[str]) -> list[dict[str, Any]]:
    """One ``DiscoveryServiceConfig`` per registry: the first named ``default`` (Talos's name for its
    one), the next ``discovery-2``, ``discovery-3``, ... An entry may be a host list (replicas of one
    registry); :meth:`MachineConfig.parse` checks the URLs."""
    return [
        {
            "apiVersion": "v1alpha1",
            "kind": "DiscoveryServiceConfig",
            "name": "default" if i == 1 else f"discovery-{i}",
            "endpoint": url,
        }
        for i, url in enumerate(endpoints, 1)
    ]


def _base_documents(
    name: str,
    endpoint: str,
    discovery: Sequence[str],
    s: Secrets,
    machine_type: str,
    cert_sans: Sequence[str],
) -> list[dict[str, Any]]:
    ca: dict[str, str] = {"crt": _b64(s.os_ca.crt)}
    if machine_type == "controlplane":
        ca["key"] = _b64(s.os_ca.key)
    machine: dict[str, Any] = {"type": machine_type, "token": s.token, "ca": ca}
    if cert_sans:
        machine["certSANs"] = list(cert_sans)
    return [
        {
            "version": "v1alpha1",
            "machine": machine,
            "cluster": {
                "id": s.cluster_id,
                "secret": s.cluster_secret,
                "controlPlane": {"endpoint": endpoint},
                "clusterName": name,
            },
        },
        {"apiVersion": "v1alpha1", "kind": "KubeSpanConfig", "enabled": True},
        *discovery_documents(discovery),
    ]


def _render(docs: list[dict[str, Any]], patches: Sequence[Patch | str | bytes]) -> str:
    docs = apply_patches(docs, patches)
    text = dump_documents(docs)
    MachineConfig.parse(text)  # raises ConfigValidationError naming the field if a patch broke it
    return text


def talosconfig(
    context: str,
    ca_crt: bytes,
    client: pki.KeyPair,
    endpoints: Sequence[str] = (),
    nodes: Sequence[str] = (),
) -> str:
    """A talosconfig with one context; ``ca``/``crt``/``key`` are base64 of the PEM, as talosctl writes."""
    doc = {
        "context": context,
        "contexts": {
            context: {
                "endpoints": list(endpoints),
                "nodes": list(nodes),
                "ca": _b64(ca_crt),
                "crt": _b64(client.crt),
                "key": _b64(client.key),
            }
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


def gen_config(
    name: str,
    endpoint: str,
    secrets: Secrets | None = None,
    patches: Sequence[Patch | str | bytes] = (),
    *,
    discovery: Sequence[str],
    controlplane_patches: Sequence[Patch | str | bytes] = (),
    worker_patches: Sequence[Patch | str | bytes] = (),
    endpoints: Sequence[str] = ("127.0.0.1",),
    nodes: Sequence[str] = (),
    roles: Sequence[str] = ADMIN_ROLES,
    cert_sans: Sequence[str] = (),
) -> GeneratedConfig:
    """Machine configs for both node types and an admin client config.

    ``endpoint`` is the Kubernetes API URL (``https://host:6443``), as talosctl's second argument,
    checked by :func:`check_cluster_endpoint`. ``discovery`` lists the discovery services (at least
    one: KubeSpan finds its peers there); spanctl's default is :data:`DEFAULT_DISCOVERY_ENDPOINT`,
    but the library has none, so a caller never registers with a public service by accident.
    ``patches`` apply to both configs, then ``controlplane_patches`` / ``worker_patches`` (strategic
    merge or JSON patch, as objects or YAML/JSON text). Each result is validated with
    :meth:`MachineConfig.parse`; a :class:`~machined.config.ConfigValidationError` names the field.
    """
    if not name or not isinstance(name, str):
        raise GenError("cluster name must be a non-empty string")
    check_cluster_endpoint(endpoint)
    if isinstance(discovery, str):
        discovery = [discovery]
    if not discovery or not all(isinstance(u, str) and u.strip() for u in discovery):
        raise GenError(
            "discovery: at least one discovery service URL, such as https://discovery.example:3000/"
        )
    s = secrets if secrets is not None else gen_secrets()
    cp = _render(
        _base_documents(name, endpoint, discovery, s, "controlplane", cert_sans),
        [*patches, *controlplane_patches],
    )
    wk = _render(
        _base_documents(name, endpoint, discovery, s, "worker", cert_sans),
        [*patches, *worker_patches],
    )
    client = pki.issue_client(s.os_ca, list(roles))
    tc = talosconfig(name, s.os_ca.crt, client, endpoints, nodes)
    return GeneratedConfig(cp, wk, tc)


def load_talosconfig_context(text: str | bytes, context: str | None = None) -> dict[str, Any]:
    """The (decoded) context of a talosconfig: ``endpoints``, ``nodes``, and ``ca``/``crt``/``key`` as PEM."""
    docs = load_documents(text, "talosconfig")
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise GenError("talosconfig must be one YAML mapping")
    doc = docs[0]
    name = context or doc.get("context")
    ctx = (doc.get("contexts") or {}).get(name)
    if not isinstance(ctx, dict):
        raise GenError(f"talosconfig has no context {name!r}")
    out = dict(ctx)
    for k in ("ca", "crt", "key"):
        out[k] = _unb64(ctx.get(k), f"talosconfig contexts.{name}.{k}")
    return out

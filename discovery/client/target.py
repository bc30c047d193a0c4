"""Discovery endpoint URLs, interpreted the way Talos does.

* ``http://host[:port]``: insecure h2c (plaintext HTTP/2), default port 80.
* ``https://host[:port]`` and ``grpc://host[:port]``: TLS, default port 443.
* bare ``host:port``: insecure.

One endpoint may name several replicas of one registry: a comma-separated host list after one scheme,
``https://10.0.0.1:3000,10.0.0.2:3000,[fd00::3]:3000`` (each host may carry its own port), and a host name
whose every A/AAAA record is a replica (resolved by the client, see :mod:`discovery.client.client`).

A path of ``/`` is accepted (Talos's default is ``https://discovery.talos.dev/``); any other path, query or
credentials are rejected. A redirect from Hello is a gRPC target ``host:port`` that keeps the TLS mode.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

_SCHEMES = {"http": (False, 80), "https": (True, 443), "grpc": (True, 443)}


@dataclass(frozen=True, slots=True)
class DiscoveryTarget:
    host: str
    port: int
    secure: bool

    @property
    def target(self) -> str:
        """gRPC channel target ``host:port`` (IPv6 literals bracketed)."""
        try:
            is_v6 = ipaddress.ip_address(self.host).version == 6
        except ValueError:
            is_v6 = False
        return f"[{self.host}]:{self.port}" if is_v6 else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.target}"


def parse_endpoint_url(url: str) -> DiscoveryTarget:
    """Parse a one-host discovery endpoint URL (see module docstring); ``ValueError`` names what is wrong."""
    text = url.strip()
    if not text:
        raise ValueError("discovery endpoint is empty")
    if "," in text:
        raise ValueError(f"discovery endpoint {url!r}: a host list is not allowed here")
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in _SCHEMES:
            raise ValueError(
                f"discovery endpoint {url!r}: unsupported scheme {scheme!r} (use http, https or grpc)"
            )
        secure, default_port = _SCHEMES[scheme]
        return _split(f"discovery endpoint {url!r}", text, secure=secure, default_port=default_port)
    return _split(f"discovery endpoint {url!r}", "//" + text, secure=False, default_port=None)


def parse_endpoint_replicas(url: str) -> tuple[DiscoveryTarget, ...]:
    """Parse an endpoint URL that may list several replicas (``scheme://h1[:p1],h2[:p2],...``).

    Every entry shares the scheme; ``ValueError`` names the entry that is wrong (empty, another scheme,
    a path, a duplicate).
    """
    text = url.strip()
    if "," not in text:
        return (parse_endpoint_url(url),)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme.lower() not in _SCHEMES:
            raise ValueError(
                f"discovery endpoint {url!r}: unsupported scheme {scheme.lower()!r} (use http, https or grpc)"
            )
        secure, default_port = _SCHEMES[scheme.lower()]
    else:
        rest, secure, default_port = text, False, None
    if rest.endswith("/"):
        rest = rest[:-1]  # Talos-style trailing slash after the last host
    targets: list[DiscoveryTarget] = []
    for n, raw in enumerate(rest.split(","), 1):
        entry = raw.strip()
        where = f"discovery endpoint {url!r}: replica {n} ({entry!r})"
        if not entry:
            raise ValueError(f"discovery endpoint {url!r}: replica {n} is empty")
        if "://" in entry:
            raise ValueError(f"{where}: one scheme for all replicas; give it only once, at the start")
        if "/" in entry:
            raise ValueError(f"{where}: paths are not supported")
        t = _split(where, "//" + entry, secure=secure, default_port=default_port)
        if t in targets:
            raise ValueError(f"{where}: listed twice")
        targets.append(t)
    return tuple(targets)


def redirect_target(endpoint: str, *, secure: bool) -> DiscoveryTarget:
    """Target of a Hello redirect (``host:port``), keeping the current TLS mode."""
    text = endpoint.strip()
    if "://" in text:  # tolerate a URL, but the TLS mode still follows the original connection
        text = text.split("://", 1)[1]
    return _split(
        f"discovery endpoint {endpoint!r}", "//" + text, secure=secure, default_port=443 if secure else 80
    )


def _split(where: str, text: str, *, secure: bool, default_port: int | None) -> DiscoveryTarget:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"{where}: missing host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{where}: credentials in the URL are not supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{where}: paths and queries are not supported")
    if port is None:
        if default_port is None:
            raise ValueError(f"{where}: a bare endpoint needs a port (host:port), or use http:// / https://")
        port = default_port
    if port == 0:
        raise ValueError(f"{where}: port 0 is not valid")
    return DiscoveryTarget(host=host, port=port, secure=secure)

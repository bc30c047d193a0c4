"""The dashboard's second source: plain ``kubespan run`` agents, read over their HTTP ``/status``.

A lab or a host without machined/apid (``make demo DEMO_ARGS=--keep``) still has each agent's read-only
HTTP address (``--http-addr``, 127.0.0.1:51821 by default). ``spanctl dashboard --web --agent URL ...``
polls each URL's ``/status`` every ``interval`` s and turns the document into the same inputs the view
model takes from apid's resource watches (:func:`status_resources`, pure), so the page is the same.

What ``/status`` does not hold is left empty: no services (the node list shows a dash), no role. The
semantics of an agent that stops answering are the apid collector's heartbeat: one missed answer shows it
unreachable at once with its last data kept and marked stale; it is never dropped, and the next answer
shows it back. No TLS and no login: these pages are bound to loopback unless the agent was told otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp

from . import model
from .source import ViewSource

log = logging.getLogger("spanctl.dashboard")


class AgentURLError(ValueError):
    """An ``--agent`` value that is not an agent's HTTP base address."""


def parse_agent_url(text: str) -> str:
    """``http(s)://HOST:PORT`` (a trailing ``/`` or ``/status`` is accepted) → the base URL without a
    trailing slash; anything else → :class:`AgentURLError` naming ``--agent``."""
    raw = text.strip()
    u = urllib.parse.urlsplit(raw)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise AgentURLError(
            f"--agent {text!r}: expected an agent's HTTP address, e.g. http://127.0.0.1:51821"
        )
    try:
        u.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise AgentURLError(f"--agent {text!r}: bad port") from None
    path = u.path.rstrip("/")
    if path.endswith("/status"):
        path = path[: -len("/status")]
    if u.query or u.fragment:
        raise AgentURLError(f"--agent {text!r}: no query or fragment expected")
    return urllib.parse.urlunsplit((u.scheme, u.netloc, path, "", ""))


def _rfc3339(ts: Any) -> str:
    """Unix time → RFC 3339 UTC as the resources carry it ("" for none or garbage)."""
    if isinstance(ts, bool) or not isinstance(ts, int | float) or ts <= 0:
        return ""
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (OverflowError, OSError, ValueError):
        return ""


def _num(value: Any) -> float | int | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _host(endpoint: str) -> str:
    """The address of ``ip:port`` / ``[v6]:port`` (the text itself if it has no port)."""
    if endpoint.startswith("["):
        return endpoint[1 : endpoint.find("]")] if "]" in endpoint else endpoint
    return endpoint.rsplit(":", 1)[0] if endpoint.count(":") == 1 else endpoint


def peer_spec(p: Mapping[str, Any]) -> dict[str, Any]:
    """One ``/status`` peer as a KubeSpanPeerStatus spec (the fields machined's controller writes)."""
    return {
        "label": str(p.get("label") or ""),
        "endpoint": str(p.get("endpoint") or ""),
        "state": str(p.get("state") or "unknown"),
        "receiveBytes": _num(p.get("rx_bytes")),
        "transmitBytes": _num(p.get("tx_bytes")),
        "lastHandshakeTime": _rfc3339(p.get("last_handshake")),
        "lastUsedEndpoint": str(p.get("last_used_endpoint") or ""),
        "lastEndpointChange": _rfc3339(p.get("last_endpoint_change")),
        "natClass": str(p.get("nat_class") or ""),
        "path": str(p.get("path") or ""),
        "relayVia": str(p.get("relay_via") or ""),
        "whyNotDirect": str(p.get("why_not_direct") or ""),
        "connectTime": _num(p.get("connect_time")),
        "rtt": _num(p.get("rtt")),
    }


def status_resources(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """An agent's ``/status`` document (``MeshStatus.as_dict()``) as the view model's resources
    (kind → id → spec): its peers, its NAT status, its published endpoints' addresses, and affiliates
    carrying the mesh addresses (its own and each peer's). No services, no members: ``/status`` has none.
    Malformed parts are skipped, never raised: a half-broken agent still shows what it has."""
    name = str(status.get("nodename") or "")
    peers: dict[str, Any] = {}
    affiliates: dict[str, Any] = {}
    if name:
        affiliates[str(status.get("node_id") or name)] = {
            "nodename": name,
            "kubespan": {"address": str(status.get("mesh_address") or "")},
        }
    raw_peers = status.get("peers")
    for i, p in enumerate(raw_peers if isinstance(raw_peers, list) else ()):
        if not isinstance(p, Mapping):
            continue
        spec = peer_spec(p)
        peers[str(p.get("public_key") or i)] = spec
        if spec["label"] and p.get("mesh_address"):
            affiliates.setdefault(
                str(p.get("node_id") or spec["label"]),
                {"nodename": spec["label"], "kubespan": {"address": str(p["mesh_address"])}},
            )
    nat: dict[str, Any] = {}
    raw_nat = status.get("nat")
    if isinstance(raw_nat, Mapping):
        nat["identity"] = {
            "natClass": str(raw_nat.get("nat_class") or ""),
            "mappedEndpoint": str(raw_nat.get("mapped") or ""),
            "publishedEndpoint": str(raw_nat.get("published") or ""),
            "error": str(raw_nat.get("error") or ""),
        }
    addrs: list[str] = []
    eps = status.get("endpoints")
    for e in [*(eps if isinstance(eps, list) else ()), status.get("public_ip")]:
        if isinstance(e, str) and e and (h := _host(e)) not in addrs:
            addrs.append(h)
    return {
        "peers": peers,
        "nat": nat,
        "affiliates": affiliates,
        "addresses": {"current": {"addresses": addrs}},
    }


class AgentState:
    """Mutable state behind one agent's :class:`~.model.NodeInput`."""

    def __init__(self, url: str, since: float) -> None:
        self.url = url
        self.name = ""
        self.reach = model.REACH_CONNECTING
        self.error = ""
        self.since: float | None = since
        self.stale = False
        self.resources: dict[str, dict[str, Any]] = {}
        self.raw: Any = None  # the last document, to skip rebuilding an unchanged one

    def snapshot(self) -> model.NodeInput:
        return model.NodeInput(
            self.url,
            self.name,
            self.reach,
            self.error,
            self.since,
            self.stale,
            "",
            {k: dict(v) for k, v in self.resources.items()},
        )


class AgentCollector(ViewSource):
    """Polls every agent's ``/status`` and keeps what the view model needs; the interface the server
    reads (``run``, ``current``, ``view_json``, ``event``) is :class:`~.collector.Collector`'s."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        interval: float = 1.0,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.urls = list(dict.fromkeys(urls))
        self.interval = interval
        self.timeout = timeout
        # no apid in between: the page's "link" is always up, each agent's reach says the rest
        super().__init__(clock, {"ok": True, "state": "agents", "error": "", "since": clock()})
        self.nodes: dict[str, AgentState] = {u: AgentState(u, clock()) for u in self.urls}

    def node_inputs(self) -> list[model.NodeInput]:
        return [n.snapshot() for n in self.nodes.values()]

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        # an agent's page is on loopback or the operator's network: never through an HTTP proxy
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            await asyncio.gather(*(self._poll(session, st) for st in self.nodes.values()))

    async def _poll(self, session: aiohttp.ClientSession, st: AgentState) -> None:
        while True:
            started = time.monotonic()
            try:
                doc = await self.fetch(session, st.url)
                self.accept(st, doc)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # whatever failed, the agent is shown unreachable, never dropped
                self.fail(st, _describe(e, st.url))
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def fetch(self, session: aiohttp.ClientSession, url: str) -> Any:
        async with session.get(url + "/status", headers={"Accept": "application/json"}) as r:
            if r.status == 503:
                raise AgentError("agent starting (503)")
            if r.status != 200:
                raise AgentError(f"HTTP {r.status} from {url}/status")
            try:
                return await r.json(content_type=None)
            except ValueError:
                raise AgentError(f"{url}/status: not JSON") from None

    def accept(self, st: AgentState, doc: Any) -> None:
        """A fresh ``/status`` document for ``st``: its data, reachable, not stale; history appended."""
        if not isinstance(doc, Mapping):
            raise AgentError(f"{st.url}/status: not a status document")
        changed = False
        if doc != st.raw:
            st.raw = doc
            st.name = str(doc.get("nodename") or st.name)
            st.resources = status_resources(doc)
            self.history = model.observe(
                self.history, st.name or st.url, st.resources["peers"].values(), self.clock()
            )
            changed = True
        if (st.reach, st.error, st.stale) != (model.REACH_OK, "", False):
            if st.reach != model.REACH_OK:
                st.since = self.clock()
            st.reach, st.error, st.stale = model.REACH_OK, "", False
            changed = True
        if changed:
            self.changed()

    def fail(self, st: AgentState, error: str) -> None:
        """``st`` did not answer: unreachable at once, its last data kept and marked stale."""
        stale = bool(st.resources)
        if (st.reach, st.error, st.stale) == (model.REACH_UNREACHABLE, error, stale):
            return
        if st.reach != model.REACH_UNREACHABLE:
            st.since = self.clock()
        st.reach, st.error, st.stale = model.REACH_UNREACHABLE, error, stale
        self.changed()


class AgentError(Exception):
    """An agent answered, but not with a status document."""


def _describe(e: BaseException, url: str) -> str:
    if isinstance(e, AgentError):
        return str(e)
    if isinstance(e, asyncio.TimeoutError | TimeoutError):
        return f"{url}: no answer in time"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"{url}: cannot connect ({e.os_error.strerror or e.os_error})"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return f"{url}: connection closed without an answer"
    if isinstance(e, aiohttp.ClientError | OSError):
        return f"{url}: {type(e).__name__}: {e}"
    log.exception("dashboard: agent %s", url)
    return f"{url}: internal error: {type(e).__name__}"

"""The mesh as resources, in Talos's names: KubeSpanIdentity, KubeSpanPeerSpec, KubeSpanPeerStatus
(read from the engine's published :class:`~kubespan.snapshot.MeshSnapshot` through
:class:`~machined.daemon.meshhost.MeshHost`, woken after every engine pass) and KubeSpanEndpoint (derived from peer statuses and affiliates).
KubeSpanNATStatus (ours, id ``local``) shows endpoint discovery: NAT class, mapped endpoint, responders.

Ids are Talos's: the identity is ``local``; peer specs, statuses and endpoints are keyed by the peer's
public key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from machined.runtime import Controller, ControllerContext, Output, weak
from machined.state.catalog import (
    AFFILIATE,
    KUBESPAN_ENDPOINT,
    KUBESPAN_IDENTITY,
    KUBESPAN_NAT_STATUS,
    KUBESPAN_PEER_SPEC,
    KUBESPAN_PEER_STATUS,
    NS_CLUSTER,
    NS_KUBESPAN,
)

from .base import Outputs, rfc3339

if TYPE_CHECKING:
    from kubespan.snapshot import NatStatus, PeerStatus
    from machined.daemon.meshhost import MeshHost

IDENTITY_ID = "local"
MESH_TIMER = 30.0  # Talos's ManagerController also runs on a 30 s timer


class KubeSpanIdentityController(Controller):
    name = "kubespan.IdentityController"
    outputs = (Output(KUBESPAN_IDENTITY),)
    interval = MESH_TIMER

    def __init__(self, host: MeshHost) -> None:
        self.host = host
        self.out = Outputs(NS_KUBESPAN, KUBESPAN_IDENTITY)

    async def reconcile(self, ctx: ControllerContext) -> None:
        snap = self.host.snapshot()
        ident = snap.identity if snap is not None else None
        if ident is not None:
            await self.out.put(
                ctx,
                IDENTITY_ID,
                {
                    "address": f"{ident.address.ip}/128",
                    "subnet": str(ident.subnet),
                    "privateKey": ident.private_key.b64,
                    "publicKey": ident.public_key.b64,
                },
            )
        await self.out.cleanup(ctx)


class KubeSpanNATStatusController(Controller):
    """This node's endpoint discovery (the snapshot's :class:`~kubespan.snapshot.NatStatus`), written
    when it changes; absent while no engine runs."""

    name = "kubespan.NATStatusController"
    outputs = (Output(KUBESPAN_NAT_STATUS),)
    interval = MESH_TIMER

    def __init__(self, host: MeshHost) -> None:
        self.host = host
        self.out = Outputs(NS_KUBESPAN, KUBESPAN_NAT_STATUS)
        self._seen: NatStatus | None = None

    async def reconcile(self, ctx: ControllerContext) -> None:
        snap = self.host.snapshot()
        nat = snap.nat if snap is not None else None
        if nat is not None and nat is self._seen:
            self.out.keep_all(ctx)
            return
        self._seen = nat
        if nat is not None:
            await self.out.put(
                ctx,
                IDENTITY_ID,
                {
                    "natClass": nat.nat_class,
                    "mappedEndpoint": nat.mapped or "",
                    "publishedEndpoint": nat.published or "",
                    "responders": list(nat.responders),
                    "stunServers": list(nat.servers),
                    "error": nat.error or "",
                    "lastCheckTime": rfc3339(nat.checked_at),
                },
            )
        await self.out.cleanup(ctx)


class KubeSpanPeerSpecController(Controller):
    name = "kubespan.PeerSpecController"
    outputs = (Output(KUBESPAN_PEER_SPEC),)
    interval = MESH_TIMER

    def __init__(self, host: MeshHost) -> None:
        self.host = host
        self.out = Outputs(NS_KUBESPAN, KUBESPAN_PEER_SPEC)
        self._seen: Any = None

    async def reconcile(self, ctx: ControllerContext) -> None:
        snap = self.host.snapshot()
        specs = snap.specs if snap is not None else None
        if specs is not None and specs is self._seen:
            self.out.keep_all(ctx)  # the engine recomputes specs only when its inputs change
            return
        self._seen = specs
        for s in specs.specs if specs is not None else ():
            await self.out.put(
                ctx,
                s.public_key.b64,
                {
                    "address": str(s.mesh_address) if s.mesh_address else "",
                    "allowedIPs": [str(p) for p in s.allowed_ips],
                    "label": s.label,
                    "endpoints": [str(e) for e in s.endpoints],
                },
            )
        await self.out.cleanup(ctx)


class KubeSpanPeerStatusController(Controller):
    """The engine's per-peer state with Talos's field names (LABEL ENDPOINT STATE RX TX columns).

    A change of state, endpoint or label is written at once (after the engine pass that saw it).
    Changes of only the counters (bytes, handshake time: every keepalive moves them) are written
    together, every ``counter_refresh`` seconds: an idle mesh of N peers does not rewrite N/25
    resources every second, and what derives from them (endpoints, machine status) runs once per
    batch rather than once per keepalive.
    """

    name = "kubespan.PeerStatusController"
    outputs = (Output(KUBESPAN_PEER_STATUS),)
    counter_refresh = 5.0
    interval = counter_refresh  # so held-back counters are written even when nothing wakes it

    def __init__(self, host: MeshHost, clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.clock = clock
        self.out = Outputs(NS_KUBESPAN, KUBESPAN_PEER_STATUS)
        self._last: dict[str, PeerStatus] = {}
        self._next_flush = 0.0

    async def reconcile(self, ctx: ControllerContext) -> None:
        now = self.clock()
        flush = now >= self._next_flush
        if flush:
            self._next_flush = now + self.counter_refresh
        seen: set[str] = set()
        for p in self.host.peers() or ():
            key = p.public_key
            seen.add(key)
            prev = self._last.get(key)
            if prev is not None and (
                prev is p
                or prev == p
                or (
                    not flush
                    and (prev.state, prev.endpoint, prev.label, prev.nat_class, prev.path, prev.relay_via)
                    == (p.state, p.endpoint, p.label, p.nat_class, p.path, p.relay_via)
                    and (prev.why_not_direct, prev.connect_time) == (p.why_not_direct, p.connect_time)
                )
            ):
                ctx.keep(NS_KUBESPAN, KUBESPAN_PEER_STATUS, key)
                continue
            await self.out.put(
                ctx,
                key,
                {
                    "label": p.label,
                    "endpoint": p.endpoint or "",
                    "state": p.state,
                    "receiveBytes": p.rx_bytes,
                    "transmitBytes": p.tx_bytes,
                    "lastHandshakeTime": rfc3339(p.last_handshake),
                    "lastUsedEndpoint": p.last_used_endpoint or "",
                    "lastEndpointChange": rfc3339(p.last_endpoint_change),
                    "natClass": p.nat_class,  # ours: the class the peer publishes
                    # ours (issue 14): lan | direct | relay | none, the relay's node name, why not direct,
                    # seconds from both sides' candidates known to the first handshake
                    "path": p.path,
                    "relayVia": p.relay_via or "",
                    "whyNotDirect": p.why_not_direct or "",
                    "connectTime": p.connect_time,
                    # ours (issue 17): smoothed round trip of answered path probes, seconds; null
                    # while none was answered (a change alone waits for the counter refresh)
                    "rtt": p.rtt,
                },
            )
            self._last[key] = p
        for key in [k for k in self._last if k not in seen]:
            del self._last[key]
        await self.out.cleanup(ctx)


class KubeSpanEndpointController(Controller):
    """Endpoints of peers that are up, with the affiliate they belong to (Talos's EndpointController:
    PeerStatus + Affiliate -> Endpoint), for publishing and for restarts."""

    name = "kubespan.EndpointController"
    inputs = (weak(NS_KUBESPAN, KUBESPAN_PEER_STATUS), weak(NS_CLUSTER, AFFILIATE))
    outputs = (Output(KUBESPAN_ENDPOINT),)

    def __init__(self) -> None:
        self.out = Outputs(NS_KUBESPAN, KUBESPAN_ENDPOINT)

    async def reconcile(self, ctx: ControllerContext) -> None:
        by_key: dict[str, str] = {}
        for a in await ctx.list(NS_CLUSTER, AFFILIATE):
            key = ((a.spec or {}).get("kubespan") or {}).get("publicKey")
            if key:
                by_key[key] = a.metadata.id
        for r in await ctx.list(NS_KUBESPAN, KUBESPAN_PEER_STATUS):
            spec = r.spec
            if spec.get("state") != "up" or not spec.get("endpoint"):
                continue
            affiliate = by_key.get(r.metadata.id)
            if affiliate is None:
                continue
            await self.out.put(ctx, r.metadata.id, {"affiliateID": affiliate, "endpoint": spec["endpoint"]})
        await self.out.cleanup(ctx)

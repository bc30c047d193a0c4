"""Cluster membership as resources (namespace ``cluster``): Affiliates (this node and every node
discovery reports) and Members (one per affiliate, keyed by node name), as Talos publishes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kubespan.peers import AffiliateError, RemoteAffiliate
from machined.runtime import Controller, ControllerContext, Output, weak
from machined.state.catalog import AFFILIATE, MEMBER, NS_CLUSTER

from .base import Outputs

if TYPE_CHECKING:
    from machined.daemon.meshhost import MeshHost

AFFILIATE_TIMER = 30.0


def _affiliate_spec(
    node_id: str,
    *,
    hostname: str,
    nodename: str,
    machine_type: str,
    operating_system: str,
    addresses: Any,
    public_key: str | None,
    mesh_address: Any,
    additional: Any,
    endpoints: Any,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodeId": node_id,
        "addresses": [str(a) for a in addresses],
        "hostname": hostname,
        "nodename": nodename,
        "machineType": machine_type,
        "operatingSystem": operating_system,
    }
    if public_key:
        spec["kubespan"] = {
            "publicKey": public_key,
            "address": str(mesh_address) if mesh_address else "",
            "additionalAddresses": [str(p) for p in additional],
            "endpoints": [str(e) for e in endpoints],
        }
    return spec


class AffiliateController(Controller):
    name = "cluster.AffiliateController"
    outputs = (Output(AFFILIATE),)
    interval = AFFILIATE_TIMER

    def __init__(self, host: MeshHost, machine_type: Callable[[], str]) -> None:
        self.host = host
        self.machine_type = machine_type
        self.out = Outputs(NS_CLUSTER, AFFILIATE)
        self._key: Any = None
        self._cache: dict[str, tuple[Any, dict[str, Any] | None]] = {}

    def _remote(self, aid: str, d: Any) -> dict[str, Any] | None:
        hit = self._cache.get(aid)
        if hit is not None and hit[0] is d:
            return hit[1]
        try:
            ra = RemoteAffiliate.from_pb(d.affiliate, d.endpoints)
        except AffiliateError:
            spec = None
        else:
            spec = _affiliate_spec(
                ra.node_id or aid,
                hostname=ra.hostname,
                nodename=ra.nodename,
                machine_type=d.affiliate.machine_type,
                operating_system=d.affiliate.operating_system,
                addresses=ra.addresses,
                public_key=ra.public_key.b64 if ra.public_key else None,
                mesh_address=ra.mesh_address,
                additional=ra.additional_prefixes,
                endpoints=ra.endpoints,
            )
        self._cache[aid] = (d, spec)
        return spec

    async def reconcile(self, ctx: ControllerContext) -> None:
        mesh = self.host.mesh
        disc = self.host.discovery
        local = mesh.local if mesh is not None else None
        version = getattr(disc, "version", None)
        key = (id(mesh), local, version, self.machine_type()) if isinstance(version, int) else None
        if key is not None and key == self._key:
            self.out.keep_all(ctx)
            return
        self._key = key
        if local is not None:
            await self.out.put(
                ctx,
                local.node_id,
                _affiliate_spec(
                    local.node_id,
                    hostname=local.hostname,
                    nodename=local.nodename,
                    machine_type=self.machine_type(),
                    operating_system=local.operating_system,
                    addresses=local.addresses,
                    public_key=local.public_key.b64,
                    mesh_address=local.mesh_address,
                    additional=local.additional_prefixes,
                    endpoints=local.endpoints,
                ),
            )
        affiliates = disc.affiliates if disc is not None else {}
        for aid in list(self._cache):
            if aid not in affiliates:
                del self._cache[aid]
        for aid, d in affiliates.items():
            spec = self._remote(aid, d)
            if spec is not None:
                await self.out.put(ctx, aid, spec)
        await self.out.cleanup(ctx)


class MemberController(Controller):
    """Affiliate -> Member (id: the node name, as Talos's members are keyed by hostname)."""

    name = "cluster.MemberController"
    inputs = (weak(NS_CLUSTER, AFFILIATE),)
    outputs = (Output(MEMBER),)

    def __init__(self) -> None:
        self.out = Outputs(NS_CLUSTER, MEMBER)

    async def reconcile(self, ctx: ControllerContext) -> None:
        for a in await ctx.list(NS_CLUSTER, AFFILIATE):
            s = a.spec
            member_id = s.get("nodename") or s.get("hostname") or a.metadata.id
            await self.out.put(
                ctx,
                member_id,
                {
                    "nodeId": s.get("nodeId", a.metadata.id),
                    "addresses": list(s.get("addresses", [])),
                    "hostname": s.get("hostname", ""),
                    "machineType": s.get("machineType", ""),
                    "operatingSystem": s.get("operatingSystem", ""),
                },
            )
        await self.out.cleanup(ctx)

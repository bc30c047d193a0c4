"""Cluster membership as resources (namespace ``cluster``): this node's Identity (id ``local``),
Affiliates (this node and every node discovery reports) and Members (one per affiliate, keyed by
node name), as Talos publishes them.

Affiliates come from the engine's :class:`~kubespan.snapshot.MeshSnapshot`, already decoded: nothing
here decodes an affiliate again."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from machined.runtime import Controller, ControllerContext, Output, weak
from machined.state.catalog import AFFILIATE, IDENTITY, MEMBER, NS_CLUSTER

from .base import Outputs

if TYPE_CHECKING:
    from kubespan.snapshot import RemoteRecord
    from machined.daemon.meshhost import MeshHost

AFFILIATE_TIMER = 30.0
LOCAL_IDENTITY = "local"  # Talos's id of the node's own Identity


class NodeIdentityController(Controller):
    """Publishes ``Identities.cluster.talos.dev/local`` with spec ``nodeId``.

    As in Talos, the node id is random (base62 of 32 bytes), made once and kept in the state
    directory, so it survives restarts and changes only when the state is wiped. It is the same id
    the mesh publishes as this node's affiliate id (both read ``node_id()``, which creates the file
    on first use); it exists whether or not the mesh runs."""

    name = "cluster.NodeIdentityController"
    outputs = (Output(IDENTITY),)

    def __init__(self, node_id: Callable[[], str]) -> None:
        self.node_id = node_id
        self.out = Outputs(NS_CLUSTER, IDENTITY)
        self._id: str | None = None

    async def reconcile(self, ctx: ControllerContext) -> None:
        if self._id is None:
            self._id = self.node_id()
        await self.out.put(ctx, LOCAL_IDENTITY, {"nodeId": self._id})
        await self.out.cleanup(ctx)


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
    api_server_port: int | None = None,
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
    if api_server_port is not None:  # Talos's AffiliateSpec.controlPlane (yaml "port"), on control planes
        spec["controlPlane"] = {"port": api_server_port}
    return spec


class AffiliateController(Controller):
    name = "cluster.AffiliateController"
    outputs = (Output(AFFILIATE),)
    interval = AFFILIATE_TIMER

    def __init__(self, host: MeshHost, machine_type: Callable[[], str]) -> None:
        self.host = host
        self.machine_type = machine_type
        self.out = Outputs(NS_CLUSTER, AFFILIATE)
        self._key: tuple[Any, ...] | None = None
        self._cache: dict[str, tuple[RemoteRecord, dict[str, Any]]] = {}

    def _remote(self, r: RemoteRecord) -> dict[str, Any]:
        hit = self._cache.get(r.id)
        if hit is not None and hit[0] is r:
            return hit[1]
        ra = r.affiliate
        spec = _affiliate_spec(
            ra.node_id or r.id,
            hostname=ra.hostname,
            nodename=ra.nodename,
            machine_type=r.machine_type,
            operating_system=r.operating_system,
            addresses=ra.addresses,
            public_key=ra.public_key.b64 if ra.public_key else None,
            mesh_address=ra.mesh_address,
            additional=ra.additional_prefixes,
            endpoints=ra.endpoints,
            api_server_port=ra.api_server_port,
        )
        self._cache[r.id] = (r, spec)
        return spec

    async def reconcile(self, ctx: ControllerContext) -> None:
        snap = self.host.snapshot()
        local = snap.published_local if snap is not None else None
        remotes = snap.remotes if snap is not None else ()
        machine_type = self.machine_type()
        key = self._key
        if (
            snap is not None
            and key is not None
            and key[0] is remotes
            and key[1] == local
            and key[2] == machine_type
        ):
            self.out.keep_all(ctx)
            return
        self._key = (remotes, local, machine_type) if snap is not None else None
        if local is not None:
            await self.out.put(
                ctx,
                local.node_id,
                _affiliate_spec(
                    local.node_id,
                    hostname=local.hostname,
                    nodename=local.nodename,
                    machine_type=machine_type,
                    operating_system=local.operating_system,
                    addresses=local.addresses,
                    public_key=local.public_key.b64,
                    mesh_address=local.mesh_address,
                    additional=local.additional_prefixes,
                    endpoints=local.endpoints,
                    api_server_port=local.api_server_port,
                ),
            )
        ids = {r.id for r in remotes}
        for aid in [a for a in self._cache if a not in ids]:
            del self._cache[aid]
        for r in remotes:
            await self.out.put(ctx, r.id, self._remote(r))
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
            member = {
                "nodeId": s.get("nodeId", a.metadata.id),
                "addresses": list(s.get("addresses", [])),
                "hostname": s.get("hostname", ""),
                "machineType": s.get("machineType", ""),
                "operatingSystem": s.get("operatingSystem", ""),
            }
            if "controlPlane" in s:  # Talos's MemberSpec.controlPlane, copied from the affiliate
                member["controlPlane"] = dict(s["controlPlane"])
            await self.out.put(ctx, member_id, member)
        await self.out.cleanup(ctx)

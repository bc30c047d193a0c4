"""The relay's adapters for the mesh engine's ports (:class:`~kubespan.ports.RelayClientPort`,
:class:`~kubespan.ports.RelayServerPort`): a :class:`RelayClient` and a :class:`RelayService` bound to
the node's mesh address and held to the mesh link once the engine has configured them."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv6Address
from typing import Any

from kubespan.relay.control import Address, Notice, RelayClient
from kubespan.relay.service import RelayService
from kubespan.wireguard.types import PublicKey


class MeshRelayClient:
    """:class:`RelayClient` on ``(mesh address, CLIENT_PORT)``, held to the mesh link."""

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self.client: RelayClient | None = None

    async def start(
        self,
        host: IPv6Address,
        device: str,
        who: Callable[[str], PublicKey | None],
        on_notify: Callable[[Notice], None],
    ) -> None:
        client = RelayClient(str(host), device=device, who=who, on_notify=on_notify)
        await client.start()
        self.client = client

    def _started(self) -> RelayClient:
        if self.client is None:
            raise RuntimeError("relay client is not started")
        return self.client

    async def allocate(self, relay: IPv6Address, peer: PublicKey) -> int:
        return (await self._started().allocate(str(relay), peer, self.timeout)).port

    async def release(self, relay: IPv6Address, peer: PublicKey) -> None:
        await self._started().release(str(relay), peer, self.timeout)

    async def ping(self, relay: IPv6Address) -> float:
        return await self._started().ping(str(relay))

    async def stop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.stop()


class MeshRelayServer:
    """:class:`RelayService`: the forwarder on every address, the control server on the mesh address."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.service: RelayService | None = None

    async def start(
        self,
        host: IPv6Address,
        device: str,
        who: Callable[[str], PublicKey | None],
        where: Callable[[PublicKey], Address | None],
    ) -> None:
        service = RelayService(str(host), who, where, device=device, **self.options)
        await service.start()
        self.service = service

    def status(self) -> dict[str, Any]:
        return self.service.status() if self.service is not None else {"running": False}

    async def stop(self) -> None:
        service, self.service = self.service, None
        if service is not None:
            await service.stop()

"""MachineConfig (the running config as a resource) and KubeSpanConfig (derived from it)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from machined.config import MachineConfig
from machined.runtime import Controller, ControllerContext, Output, weak
from machined.state.catalog import KUBESPAN_CONFIG, MACHINE_CONFIG, NS_CONFIG

from .base import Outputs

MACHINE_CONFIG_ID = "v1alpha1"  # Talos's id for the active machine config
KUBESPAN_CONFIG_ID = "kubespan"


class MachineConfigSpec:
    """The spec of the MachineConfig resource: the running config (immutable). ``yaml_spec`` is the
    config's multi-document text, as Talos shows it."""

    __slots__ = ("config",)

    def __init__(self, config: MachineConfig) -> None:
        self.config = config

    def to_data(self) -> list[Any]:
        return self.config.documents()

    def yaml_text(self) -> str:
        return self.config.canonical_yaml()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MachineConfigSpec) and self.config == other.config

    __hash__ = None  # type: ignore[assignment]

    def __deepcopy__(self, memo: dict[int, Any]) -> MachineConfigSpec:
        return self  # immutable


class MachineConfigController(Controller):
    """Publishes the running config (woken by the agent on every config change)."""

    name = "config.MachineConfigController"
    outputs = (Output(MACHINE_CONFIG),)

    def __init__(self, running: Callable[[], MachineConfig | None]) -> None:
        self.running = running
        self.out = Outputs(NS_CONFIG, MACHINE_CONFIG)

    async def reconcile(self, ctx: ControllerContext) -> None:
        cfg = self.running()
        if cfg is not None:
            await self.out.put(ctx, MACHINE_CONFIG_ID, MachineConfigSpec(cfg))
        await self.out.cleanup(ctx)


def kubespan_config_spec(cfg: MachineConfig) -> dict[str, Any]:
    """Talos's KubeSpanConfigSpec fields (camelCase) from the config."""
    m = cfg.mesh()
    return {
        "enabled": m.enabled,
        "clusterId": m.cluster_id,
        "sharedSecret": base64.b64encode(m.cluster_secret).decode() if m.cluster_secret else "",
        "forceRouting": True,
        "advertiseKubernetesNetworks": m.advertise_kubernetes_networks,
        "mtu": m.config.mtu,
        "endpointFilters": list(m.endpoint_filters),
        "harvestExtraEndpoints": m.publish_learned,
        "extraEndpoints": [str(e) for e in m.extra_endpoints],
        "excludeAdvertisedNetworks": [str(n) for n in m.exclude],
    }


class KubeSpanConfigController(Controller):
    """MachineConfig -> KubeSpanConfig (a transform, as Talos's kubespan.ConfigController)."""

    name = "kubespan.ConfigController"
    inputs = (weak(NS_CONFIG, MACHINE_CONFIG, MACHINE_CONFIG_ID),)
    outputs = (Output(KUBESPAN_CONFIG),)

    def __init__(self) -> None:
        self.out = Outputs(NS_CONFIG, KUBESPAN_CONFIG)

    async def reconcile(self, ctx: ControllerContext) -> None:
        mc = await ctx.find(NS_CONFIG, MACHINE_CONFIG, MACHINE_CONFIG_ID)
        if mc is not None and isinstance(mc.spec, MachineConfigSpec):
            await self.out.put(ctx, KUBESPAN_CONFIG_ID, kubespan_config_spec(mc.spec.config))
        await self.out.cleanup(ctx)

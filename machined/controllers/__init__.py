"""machined's controllers: the mesh, the cluster, the network, the services and the config as
resources, in Talos's names and namespaces (``machined.state.catalog``).

Controllers that read a *source* (the mesh engine, the discovery client, the supervisor, the config
manager, netlink) have no resource inputs: the agent wakes them when the source changes
(:meth:`Runtime.wake`) and their timer catches anything missed. Controllers that derive resources
from resources (KubeSpanConfig, KubeSpanEndpoint, Member, NodeAddress, MachineStatus) declare them as
inputs and are woken by the runtime. Every controller writes only what changed.
"""

from __future__ import annotations

from .base import Outputs, rfc3339
from .cluster import LOCAL_IDENTITY, AffiliateController, MemberController, NodeIdentityController
from .config import (
    KUBESPAN_CONFIG_ID,
    MACHINE_CONFIG_ID,
    KubeSpanConfigController,
    MachineConfigController,
    MachineConfigSpec,
    kubespan_config_spec,
)
from .kubespan import (
    IDENTITY_ID,
    KubeSpanEndpointController,
    KubeSpanIdentityController,
    KubeSpanNATStatusController,
    KubeSpanPeerSpecController,
    KubeSpanPeerStatusController,
)
from .network import NetworkStatusController, NodeAddressController
from .runtime import (
    MACHINE_STATUS_ID,
    MACHINED_SERVICE,
    MachineStatusController,
    ServiceController,
    service_spec,
)

__all__ = [
    "IDENTITY_ID",
    "KUBESPAN_CONFIG_ID",
    "LOCAL_IDENTITY",
    "MACHINED_SERVICE",
    "MACHINE_CONFIG_ID",
    "MACHINE_STATUS_ID",
    "AffiliateController",
    "KubeSpanConfigController",
    "KubeSpanEndpointController",
    "KubeSpanIdentityController",
    "KubeSpanNATStatusController",
    "KubeSpanPeerSpecController",
    "KubeSpanPeerStatusController",
    "MachineConfigController",
    "MachineConfigSpec",
    "MachineStatusController",
    "MemberController",
    "NetworkStatusController",
    "NodeAddressController",
    "NodeIdentityController",
    "Outputs",
    "ServiceController",
    "kubespan_config_spec",
    "rfc3339",
    "service_spec",
]

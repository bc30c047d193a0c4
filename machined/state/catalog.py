"""The resource types machined publishes, in Talos's names and namespaces.

Type names, namespaces and sensitivity follow Talos (see
``reference/machined.md`` §2) so that ``talosctl get kubespanpeerstatuses``
works against us. Print columns and aliases of Talos's types are Talos's (names and
JSONPaths from each type's ``ResourceDefinition`` in Talos's ``pkg/machinery/resources``);
KubeSpanNATStatuses is ours alone. Spec keys are camelCase, as in Talos's YAML.
"""

from __future__ import annotations

from collections.abc import Iterable

from .definitions import RESOURCE_DEFINITIONS, PrintColumn, ResourceDefinition, resolve

NS_CONFIG = "config"
NS_KUBESPAN = "kubespan"
NS_CLUSTER = "cluster"
NS_NETWORK = "network"
NS_RUNTIME = "runtime"
NS_META = "meta"

KUBESPAN_CONFIG = "KubeSpanConfigs.kubespan.talos.dev"
KUBESPAN_IDENTITY = "KubeSpanIdentities.kubespan.talos.dev"
KUBESPAN_PEER_SPEC = "KubeSpanPeerSpecs.kubespan.talos.dev"
KUBESPAN_PEER_STATUS = "KubeSpanPeerStatuses.kubespan.talos.dev"
KUBESPAN_ENDPOINT = "KubeSpanEndpoints.kubespan.talos.dev"
KUBESPAN_NAT_STATUS = "KubeSpanNATStatuses.kubespan.talos.dev"  # ours: endpoint discovery (STUN)
AFFILIATE = "Affiliates.cluster.talos.dev"
IDENTITY = "Identities.cluster.talos.dev"  # this node's cluster identity (id "local")
MEMBER = "Members.cluster.talos.dev"
LINK_STATUS = "LinkStatuses.net.talos.dev"
ADDRESS_STATUS = "AddressStatuses.net.talos.dev"
ROUTE_STATUS = "RouteStatuses.net.talos.dev"
NODE_ADDRESS = "NodeAddresses.net.talos.dev"
SERVICE = "Services.v1alpha1.talos.dev"
MACHINE_STATUS = "MachineStatuses.runtime.talos.dev"
MACHINE_CONFIG = "MachineConfigs.config.talos.dev"


def _cols(*pairs: tuple[str, str]) -> tuple[PrintColumn, ...]:
    return tuple(PrintColumn(name, path) for name, path in pairs)


MESH_DEFINITIONS: tuple[ResourceDefinition, ...] = (
    ResourceDefinition(KUBESPAN_CONFIG, NS_CONFIG, sensitive=True),
    ResourceDefinition(
        KUBESPAN_IDENTITY,
        NS_KUBESPAN,
        sensitive=True,
        print_columns=_cols(("Address", "{.address}"), ("PublicKey", "{.publicKey}")),
    ),
    ResourceDefinition(
        KUBESPAN_PEER_SPEC,
        NS_KUBESPAN,
        print_columns=_cols(("Label", "{.label}"), ("Endpoints", "{.endpoints}")),
    ),
    ResourceDefinition(
        KUBESPAN_PEER_STATUS,
        NS_KUBESPAN,
        print_columns=_cols(
            ("Label", "{.label}"),
            ("Endpoint", "{.endpoint}"),
            ("State", "{.state}"),
            ("Rx", "{.receiveBytes}"),
            ("Tx", "{.transmitBytes}"),
        ),
    ),
    ResourceDefinition(
        KUBESPAN_ENDPOINT,
        NS_KUBESPAN,
        print_columns=_cols(("Endpoint", "{.endpoint}"), ("Affiliate ID", "{.affiliateID}")),
    ),
    ResourceDefinition(
        KUBESPAN_NAT_STATUS,
        NS_KUBESPAN,
        singular="KubeSpanNATStatus",
        aliases=("kubespannat",),
        print_columns=_cols(
            ("Class", "{.natClass}"),
            ("Mapped", "{.mappedEndpoint}"),
            ("Published", "{.publishedEndpoint}"),
            ("Error", "{.error}"),
        ),
    ),
    ResourceDefinition(
        AFFILIATE,
        NS_CLUSTER,
        print_columns=_cols(
            ("Hostname", "{.hostname}"), ("Machine Type", "{.machineType}"), ("Addresses", "{.addresses}")
        ),
    ),
    ResourceDefinition(IDENTITY, NS_CLUSTER, print_columns=_cols(("ID", "{.nodeId}"))),
    ResourceDefinition(
        MEMBER,
        NS_CLUSTER,
        print_columns=_cols(
            ("Hostname", "{.hostname}"),
            ("Machine Type", "{.machineType}"),
            ("OS", "{.operatingSystem}"),
            ("Addresses", "{.addresses}"),
        ),
    ),
    ResourceDefinition(
        LINK_STATUS,
        NS_NETWORK,
        aliases=("link", "links"),
        print_columns=_cols(
            ("Alias", "{.alias}"),
            ("Type", "{.type}"),
            ("Kind", "{.kind}"),
            ("Hw Addr", "{.hardwareAddr}"),
            ("Oper State", "{.operationalState}"),
            ("Link State", "{.linkState}"),
        ),
    ),
    ResourceDefinition(
        ADDRESS_STATUS,
        NS_NETWORK,
        aliases=("address", "addresses"),
        print_columns=_cols(("Address", "{.address}"), ("Link", "{.linkName}")),
    ),
    ResourceDefinition(
        ROUTE_STATUS,
        NS_NETWORK,
        aliases=("route", "routes"),
        print_columns=_cols(
            ("Destination", "{.dst}"),
            ("Gateway", "{.gateway}"),
            ("Link", "{.outLinkName}"),
            ("Metric", "{.priority}"),
        ),
    ),
    ResourceDefinition(
        NODE_ADDRESS,
        NS_NETWORK,
        print_columns=_cols(("Addresses", "{.addresses}"), ("SortAlgorithm", "{.sortAlgorithm}")),
    ),
    ResourceDefinition(
        SERVICE,
        NS_RUNTIME,
        aliases=("svc",),
        print_columns=_cols(
            ("Running", "{.running}"), ("Healthy", "{.healthy}"), ("Health Unknown", "{.unknown}")
        ),
    ),
    ResourceDefinition(
        MACHINE_STATUS,
        NS_RUNTIME,
        print_columns=_cols(("Stage", "{.stage}"), ("Ready", "{.status.ready}")),
    ),
    # the machine config holds the cluster secret and the CA: sensitive, as in Talos
    ResourceDefinition(MACHINE_CONFIG, NS_CONFIG, sensitive=True),
)

DEFINITIONS: tuple[ResourceDefinition, ...] = (RESOURCE_DEFINITIONS, *MESH_DEFINITIONS)


def resolve_type(arg: str, definitions: Iterable[ResourceDefinition] = DEFINITIONS) -> ResourceDefinition:
    """Resolve a type argument (``kubespanpeerstatuses``, ``ksps``, ``links``...), case-insensitively.

    Raises :class:`UnknownTypeError` ("not registered") or :class:`AmbiguousTypeError`.
    """
    return resolve(arg, definitions)

from spanapi.talos.common import netip_pb2 as _netip_pb2
from spanapi.talos.resource.definitions.enums import enums_pb2 as _enums_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AffiliateSpec(_message.Message):
    __slots__ = ("node_id", "addresses", "hostname", "nodename", "operating_system", "machine_type", "kube_span", "control_plane")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    NODENAME_FIELD_NUMBER: _ClassVar[int]
    OPERATING_SYSTEM_FIELD_NUMBER: _ClassVar[int]
    MACHINE_TYPE_FIELD_NUMBER: _ClassVar[int]
    KUBE_SPAN_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PLANE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    addresses: _containers.RepeatedCompositeFieldContainer[_netip_pb2.NetIP]
    hostname: str
    nodename: str
    operating_system: str
    machine_type: _enums_pb2.MachineType
    kube_span: KubeSpanAffiliateSpec
    control_plane: ControlPlane
    def __init__(self, node_id: _Optional[str] = ..., addresses: _Optional[_Iterable[_Union[_netip_pb2.NetIP, _Mapping]]] = ..., hostname: _Optional[str] = ..., nodename: _Optional[str] = ..., operating_system: _Optional[str] = ..., machine_type: _Optional[_Union[_enums_pb2.MachineType, str]] = ..., kube_span: _Optional[_Union[KubeSpanAffiliateSpec, _Mapping]] = ..., control_plane: _Optional[_Union[ControlPlane, _Mapping]] = ...) -> None: ...

class ControlPlane(_message.Message):
    __slots__ = ("api_server_port",)
    API_SERVER_PORT_FIELD_NUMBER: _ClassVar[int]
    api_server_port: int
    def __init__(self, api_server_port: _Optional[int] = ...) -> None: ...

class IdentitySpec(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class KubeSpanAffiliateSpec(_message.Message):
    __slots__ = ("public_key", "address", "additional_addresses", "endpoints", "exclude_advertised_networks")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ADDITIONAL_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ADVERTISED_NETWORKS_FIELD_NUMBER: _ClassVar[int]
    public_key: str
    address: _netip_pb2.NetIP
    additional_addresses: _containers.RepeatedCompositeFieldContainer[_netip_pb2.NetIPPrefix]
    endpoints: _containers.RepeatedCompositeFieldContainer[_netip_pb2.NetIPPort]
    exclude_advertised_networks: _containers.RepeatedCompositeFieldContainer[_netip_pb2.NetIPPrefix]
    def __init__(self, public_key: _Optional[str] = ..., address: _Optional[_Union[_netip_pb2.NetIP, _Mapping]] = ..., additional_addresses: _Optional[_Iterable[_Union[_netip_pb2.NetIPPrefix, _Mapping]]] = ..., endpoints: _Optional[_Iterable[_Union[_netip_pb2.NetIPPort, _Mapping]]] = ..., exclude_advertised_networks: _Optional[_Iterable[_Union[_netip_pb2.NetIPPrefix, _Mapping]]] = ...) -> None: ...

class MemberSpec(_message.Message):
    __slots__ = ("node_id", "addresses", "hostname", "machine_type", "operating_system", "control_plane")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    MACHINE_TYPE_FIELD_NUMBER: _ClassVar[int]
    OPERATING_SYSTEM_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PLANE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    addresses: _containers.RepeatedCompositeFieldContainer[_netip_pb2.NetIP]
    hostname: str
    machine_type: _enums_pb2.MachineType
    operating_system: str
    control_plane: ControlPlane
    def __init__(self, node_id: _Optional[str] = ..., addresses: _Optional[_Iterable[_Union[_netip_pb2.NetIP, _Mapping]]] = ..., hostname: _Optional[str] = ..., machine_type: _Optional[_Union[_enums_pb2.MachineType, str]] = ..., operating_system: _Optional[str] = ..., control_plane: _Optional[_Union[ControlPlane, _Mapping]] = ...) -> None: ...

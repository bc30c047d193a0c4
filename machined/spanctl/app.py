"""spanctl's application object: the connection, fanned-out calls and resource definitions."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import IO, Any

import grpc
from google.protobuf import empty_pb2

from machined.state.definitions import RESOURCE_DEFINITION_TYPE, ResourceDefinition, resolve
from machined.state.errors import AmbiguousTypeError, UnknownTypeError
from spanapi.talos.cosi import state_pb2, state_pb2_grpc
from spanapi.talos.machine import machine_pb2, machine_pb2_grpc

from . import mesh as meshmod
from .client import Errors, Target, split_messages
from .config import ClientConfig, default_path
from .output import definition_from_spec, spec_data

META_NAMESPACE = "meta"
MACHINE_CONFIG_TYPE = "MachineConfigs.config.talos.dev"
MACHINE_CONFIG_ID = "v1alpha1"
PEER_STATUS_TYPE = "KubeSpanPeerStatuses.kubespan.talos.dev"
PEER_STATUS_NAMESPACE = "kubespan"
APPLY_MODES = {
    "auto": machine_pb2.ApplyConfigurationRequest.AUTO,
    "no-reboot": machine_pb2.ApplyConfigurationRequest.NO_REBOOT,
    "reboot": machine_pb2.ApplyConfigurationRequest.REBOOT,
    "staged": machine_pb2.ApplyConfigurationRequest.STAGED,
    "try": machine_pb2.ApplyConfigurationRequest.TRY,
}


class UsageError(Exception):
    pass


def csv_items(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def age(ts_seconds: float, now: float | None = None) -> str:
    now = time.time() if now is None else now
    d = max(0, int(now - ts_seconds))
    h, rem = divmod(d, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s ago"
    if m:
        return f"{m}m{s}s ago"
    return f"{s}s ago"


# -- the application ----------------------------------------------------------------------------


class App:
    def __init__(self, ns: argparse.Namespace, out: IO[str], err: IO[str]) -> None:
        self.ns = ns
        self.out = out
        self.err = err
        self.errors = Errors()
        self.config_path = default_path(ns.config)
        self._target: Target | None = None
        self._hostname: str | None = None

    # connection ---------------------------------------------------------------------------------

    def client_config(self) -> ClientConfig:
        return ClientConfig.load(self.config_path)

    @property
    def target(self) -> Target:
        if self._target is None:
            t = Target.from_args(
                self.client_config(),
                context=self.ns.context,
                endpoints=self.ns.endpoints,
                nodes=self.ns.nodes,
                socket=self.ns.socket,
                cluster=getattr(self.ns, "cluster", None),
            )
            t.check()
            self._target = t
        return self._target

    def label(self, node: str | None) -> str:
        """The NODE cell: the node as given, or the hostname of the socket's machined (talosctl shows
        the peer address; a socket path says less than the node's name)."""
        t = self.target
        node = node or (t.nodes[0] if t.direct and t.nodes else None)
        if node or not t.direct:
            return t.label(node)
        if self._hostname is None:
            self._hostname = ""
            try:
                resp = self.machine().Hostname(empty_pb2.Empty(), timeout=t.timeout)
                good, _ = split_messages(resp.messages, "")
                self._hostname = good[0].hostname if good else ""
            except grpc.RpcError:
                pass
        return self._hostname or t.label(None)

    def machine(self) -> Any:
        return machine_pb2_grpc.MachineServiceStub(self.target.channel())

    def state(self) -> Any:
        return state_pb2_grpc.StateStub(self.target.channel())

    def all_label(self) -> str:
        t = self.target
        return ", ".join(t.nodes) if t.nodes and not t.direct else self.label(t.nodes[0] if t.nodes else None)

    def unary(self, method: Callable[..., Any], request: Any) -> list[Any]:
        """A fanned-out unary call: good items (apid's error entries go to the per-node errors)."""
        t = self.target
        try:
            resp = method(request, metadata=t.fanout_metadata(), timeout=t.timeout)
        except grpc.RpcError as e:
            self.errors.rpc(self.all_label(), e, t.where)
            return []
        good, errs = split_messages(resp.messages, self.label(None))
        self.errors.extend(errs)
        return good

    def stream(self, method: Callable[..., Any], request: Any, on_item: Callable[[Any], None]) -> None:
        t = self.target
        try:
            for item in method(request, metadata=t.fanout_metadata()):
                md = item.metadata
                if md.error:
                    self.errors.add(md.hostname or self.label(None), md.error)
                    continue
                on_item(item)
        except grpc.RpcError as e:
            self.errors.rpc(self.all_label(), e, t.where)

    # resource definitions -------------------------------------------------------------------------

    def definitions(self, node: str | None) -> list[ResourceDefinition]:
        t = self.target
        defs = []
        for r in self.state().List(
            state_pb2.ListRequest(namespace=META_NAMESPACE, type=RESOURCE_DEFINITION_TYPE),
            metadata=t.node_metadata(node),
            timeout=t.timeout,
        ):
            defs.append(definition_from_spec(spec_data(r.resource)))
        return defs

    def resolve_type(self, arg: str) -> ResourceDefinition | None:
        node = self.target.each_node()[0]
        try:
            return resolve(arg, self.definitions(node))
        except (UnknownTypeError, AmbiguousTypeError) as e:
            raise UsageError(str(e)) from None
        except grpc.RpcError as e:
            self.errors.rpc(self.label(node), e, self.target.where)
            return None

    def peers(self, node: str | None) -> list[meshmod.Peer]:
        t = self.target
        return [
            meshmod.Peer.from_spec(spec_data(r.resource), r.resource.metadata.id)
            for r in self.state().List(
                state_pb2.ListRequest(namespace=PEER_STATUS_NAMESPACE, type=PEER_STATUS_TYPE),
                metadata=t.node_metadata(node),
                timeout=t.timeout,
            )
        ]

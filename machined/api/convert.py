"""Conversions from machined's values to the machine API and COSI messages."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2

from machined.services import HealthStatus, ServiceEvent, ServiceStatus
from machined.state import Resource
from machined.state.resource import dump_yaml
from spanapi.talos.cosi import resource_pb2
from spanapi.talos.machine import machine_pb2

from . import protospec

log = logging.getLogger("machined.api")
_warned: set[str] = set()
_WARNED_MAX = 1024


def _warn_once(text: str) -> None:
    """Log a warning the first time it occurs (a List or Watch would repeat it for every reply)."""
    if text in _warned:
        return
    if len(_warned) >= _WARNED_MAX:
        _warned.clear()
    _warned.add(text)
    log.warning("%s", text)


_STAGES = {
    "booting": machine_pb2.MachineStatusEvent.BOOTING,
    "running": machine_pb2.MachineStatusEvent.RUNNING,
    "shuttingDown": machine_pb2.MachineStatusEvent.SHUTTING_DOWN,
}


def timestamp(value: float | datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    if isinstance(value, datetime):
        ts.FromDatetime(value)
    else:
        ts.FromNanoseconds(int(value * 1e9))
    return ts


def service_health(h: HealthStatus) -> machine_pb2.ServiceHealth:
    return machine_pb2.ServiceHealth(
        unknown=h.unknown,
        healthy=h.healthy,
        last_message=h.last_message,
        last_change=timestamp(h.last_change),
    )


def service_state_event(
    ev: ServiceEvent, health: HealthStatus | None = None
) -> machine_pb2.ServiceStateEvent:
    msg = machine_pb2.ServiceStateEvent(service=ev.service, action=int(ev.state), message=ev.message)
    if health is not None:
        msg.health.CopyFrom(service_health(health))
    return msg


def service_info(st: ServiceStatus) -> machine_pb2.ServiceInfo:
    health = st.health
    if not st.has_health_check:  # nothing probes it: healthy while running, as the Service resource says
        from machined.services import ServiceState

        health = HealthStatus(unknown=False, healthy=st.state is ServiceState.RUNNING)
    return machine_pb2.ServiceInfo(
        id=st.name,
        state=str(st.state),
        events=machine_pb2.ServiceEvents(
            events=[
                machine_pb2.ServiceEvent(msg=e.message, state=str(e.state), ts=timestamp(e.timestamp))
                for e in st.events
            ]
        ),
        health=service_health(health),
    )


def machine_status_event(spec: Any) -> machine_pb2.MachineStatusEvent:
    status = spec.get("status", {}) if isinstance(spec, dict) else {}
    return machine_pb2.MachineStatusEvent(
        stage=_STAGES.get(spec.get("stage", ""), machine_pb2.MachineStatusEvent.UNKNOWN),
        status=machine_pb2.MachineStatusEvent.MachineStatus(
            ready=bool(status.get("ready")),
            unmet_conditions=[
                machine_pb2.MachineStatusEvent.MachineStatus.UnmetCondition(
                    name=c.get("name", ""), reason=c.get("reason", "")
                )
                for c in status.get("unmetConditions", [])
            ],
        ),
    )


def spec(r: Resource) -> resource_pb2.Spec:
    """``yaml_spec`` and ``proto_spec`` (Talos's message, see :mod:`machined.api.protospec`) of one
    resource, both from the same spec data. A spec value that does not fit its Talos field is logged
    and leaves ``proto_spec`` empty: the reply still carries ``yaml_spec``."""
    text = getattr(r.spec, "yaml_text", None)
    data: object = None
    if callable(text):
        yaml_text = text()
    else:
        data = r.spec_data()
        yaml_text = dump_yaml(data)
    try:
        proto = protospec.encode(r.metadata.type, r.spec, lambda: data)
    except protospec.ProtoSpecError as e:
        _warn_once(f"proto_spec left empty for {r.metadata.namespace}/{r.metadata.id}: {e}")
        proto = b""
    return resource_pb2.Spec(proto_spec=proto, yaml_spec=yaml_text)


def resource(r: Resource) -> resource_pb2.Resource:
    md = r.metadata
    out = resource_pb2.Resource(
        metadata=resource_pb2.Metadata(
            namespace=md.namespace,
            type=md.type,
            id=md.id,
            version=str(md.version),
            owner=md.owner,
            phase=str(md.phase),
            finalizers=list(md.finalizers),
            labels=dict(md.labels),
            annotations=dict(md.annotations),
        ),
        spec=spec(r),
    )
    if md.created is not None:
        out.metadata.created.FromDatetime(md.created)
    if md.updated is not None:
        out.metadata.updated.FromDatetime(md.updated)
    return out

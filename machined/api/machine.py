"""``machine.MachineService`` served by machined (grpc.aio).

Every reply item carries ``metadata.hostname`` (the node name). Roles come from the ``talos-role``
metadata (see :mod:`machined.api.roles`); every method checks Talos's rule first and answers
PERMISSION_DENIED "not authorized" otherwise. OS-only calls (Reboot, Shutdown, Upgrade, Reset) answer
FAILED_PRECONDITION, as Talos does in container mode.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import logging
import platform
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import any_pb2, empty_pb2

from machined.config import (
    DEFAULT_TRY_TIMEOUT,
    ApplyError,
    ApplyMode,
    ConfigManager,
    ConfigValidationError,
)
from machined.services import EventRing, LogRing, Supervisor, UnknownService
from machined.state import State
from spanapi.talos.common import common_pb2
from spanapi.talos.machine import machine_pb2, machine_pb2_grpc
from spanutil.logs import log_event

from . import sysinfo
from .convert import service_info, timestamp
from .envelope import metadata
from .roles import KNOWN_ROLES, allowed, roles_from_metadata

log = logging.getLogger("machined.api")

SERVICE = "/machine.MachineService/"
NOT_OS = "method is not supported: machined is not the operating system"
CHUNK = 64 * 1024
K8S_NAMESPACE = "k8s.io"  # Talos's containerd namespace of Kubernetes containers (talosctl logs -k)
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}
_APPLY_CODES = {
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "unimplemented": grpc.StatusCode.UNIMPLEMENTED,
}


class Node(Protocol):
    """What the API needs from the agent (:class:`machined.daemon.Agent` provides it)."""

    @property
    def hostname(self) -> str: ...

    config: ConfigManager
    supervisor: Supervisor | None
    state: State
    machined_events: EventRing
    events: Any  # machined.daemon.events.MachineEvents

    def log_ring(self, id: str) -> LogRing | None: ...


MAX_STATUS_BYTES = 4096  # a status message travels percent-encoded in trailers; gRPC allows ~8 KiB of them


def status_message(text: str, limit: int = MAX_STATUS_BYTES) -> str:
    """``text`` cut so that its percent-encoded form (``grpc-message``: every byte outside printable
    ASCII, and ``%``, takes three) fits in ``limit`` bytes, with `` ... (truncated)`` at the cut."""
    tail = " ... (truncated)"
    used, cut = 0, len(text)
    for i, ch in enumerate(text):
        used += 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode("utf-8", "replace"))
        if used > limit - len(tail) and cut == len(text):
            cut = i
        if used > limit:
            return text[:cut] + tail
    return text


def _version() -> str:
    try:
        return "v" + importlib.metadata.version("kubespan-mesh")
    except importlib.metadata.PackageNotFoundError:
        return "v0.0.0-dev"


def unary(name: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    method = SERVICE + name

    def deco(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def wrapper(self: MachineServicer, request: Any, context: Any) -> Any:
            roles = roles_from_metadata(context.invocation_metadata())
            if not allowed(method, roles):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not authorized")
            return await fn(self, request, context)

        return wrapper

    return deco


def stream(name: str) -> Callable[[Callable[..., AsyncIterator[Any]]], Callable[..., AsyncIterator[Any]]]:
    method = SERVICE + name

    def deco(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        @functools.wraps(fn)
        async def wrapper(self: MachineServicer, request: Any, context: Any) -> AsyncIterator[Any]:
            roles = roles_from_metadata(context.invocation_metadata())
            if not allowed(method, roles):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not authorized")
            async for item in fn(self, request, context):
                yield item

        return wrapper

    return deco


class MachineServicer(machine_pb2_grpc.MachineServiceServicer):
    def __init__(self, node: Node, *, proc: Path = sysinfo.PROC, kmsg: Path = sysinfo.KMSG) -> None:
        self.node = node
        self.proc = proc
        self.kmsg = kmsg

    def _md(self) -> common_pb2.Metadata:
        return metadata(self.node.hostname)

    # -- identity ------------------------------------------------------------------------------

    @unary("Version")
    async def Version(self, request: empty_pb2.Empty, context: Any) -> machine_pb2.VersionResponse:
        return machine_pb2.VersionResponse(
            messages=[
                machine_pb2.Version(
                    metadata=self._md(),
                    version=machine_pb2.VersionInfo(
                        tag=_version(),
                        go_version=f"python{platform.python_version()}",
                        os=platform.system().lower(),
                        arch=_ARCH.get(platform.machine(), platform.machine()),
                    ),
                    platform=machine_pb2.PlatformInfo(name="linux", mode="agent"),
                    features=machine_pb2.FeaturesInfo(rbac=True),
                )
            ]
        )

    @unary("Hostname")
    async def Hostname(self, request: empty_pb2.Empty, context: Any) -> machine_pb2.HostnameResponse:
        return machine_pb2.HostnameResponse(
            messages=[machine_pb2.Hostname(metadata=self._md(), hostname=self.node.hostname)]
        )

    @unary("GenerateClientConfiguration")
    async def GenerateClientConfiguration(
        self, request: machine_pb2.GenerateClientConfigurationRequest, context: Any
    ) -> machine_pb2.GenerateClientConfigurationResponse:
        from .certs import DEFAULT_TTL, CertError, issue_client_certificate, talosconfig

        cfg = self.node.config.running
        ca = cfg.v1alpha1.ca if cfg is not None else None
        if ca is None or ca.key is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this node does not hold the machine CA key (machine.ca.key): "
                "generate client configurations on a control-plane node",
            )
        roles = list(dict.fromkeys(request.roles))
        unknown = [r for r in roles if r not in KNOWN_ROLES]
        if not roles or unknown:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"roles: unknown role(s) {', '.join(unknown)}"
                if unknown
                else "roles: at least one role is required",
            )
        ttl = request.crt_ttl.ToTimedelta() if request.HasField("crt_ttl") else DEFAULT_TTL
        try:
            crt, key = issue_client_certificate(ca.crt, ca.key, roles, ttl)
        except CertError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"machine CA unusable: {e}")
        name = (cfg.v1alpha1.cluster_name if cfg is not None else None) or "machined"
        return machine_pb2.GenerateClientConfigurationResponse(
            messages=[
                machine_pb2.GenerateClientConfiguration(
                    metadata=self._md(),
                    ca=ca.crt,
                    crt=crt,
                    key=key,
                    talosconfig=talosconfig(name, ca.crt, crt, key),
                )
            ]
        )

    # -- config --------------------------------------------------------------------------------

    @unary("ApplyConfiguration")
    async def ApplyConfiguration(
        self, request: machine_pb2.ApplyConfigurationRequest, context: Any
    ) -> machine_pb2.ApplyConfigurationResponse:
        try_timeout = DEFAULT_TRY_TIMEOUT
        if request.HasField("try_mode_timeout"):  # not ToTimedelta(): it overflows past 999999999 days
            d = request.try_mode_timeout
            try_timeout = d.seconds + d.nanos / 1e9  # range-checked (TRY only) by the config manager
        try:
            result = await self.node.config.apply_async(
                bytes(request.data), request.mode, dry_run=request.dry_run, try_timeout=try_timeout
            )
        except ConfigValidationError as e:
            self.node.events.publish(machine_pb2.ConfigValidationErrorEvent(error=str(e)))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, status_message(str(e)))
        except ApplyError as e:
            code = _APPLY_CODES.get(e.code, grpc.StatusCode.FAILED_PRECONDITION)
            await context.abort(code, status_message(str(e)))
        details = result.mode_details
        if result.dry_run:
            details = f"Dry run summary:\n{details}\n\nConfig diff:\n\n{result.diff}"
        else:
            log_event(log, "config applied", mode=ApplyMode(result.mode).name, details=result.mode_details)
        return machine_pb2.ApplyConfigurationResponse(
            messages=[
                machine_pb2.ApplyConfiguration(
                    metadata=self._md(),
                    warnings=list(result.warnings),
                    mode=int(result.mode),
                    mode_details=details,
                )
            ]
        )

    # -- services ------------------------------------------------------------------------------

    def _machined_info(self) -> machine_pb2.ServiceInfo:
        return machine_pb2.ServiceInfo(
            id="machined",
            state="Running",
            events=machine_pb2.ServiceEvents(
                events=[
                    machine_pb2.ServiceEvent(msg=e.message, state=str(e.state), ts=timestamp(e.timestamp))
                    for e in self.node.machined_events
                ]
            ),
            health=machine_pb2.ServiceHealth(unknown=False, healthy=True),
        )

    @unary("ServiceList")
    async def ServiceList(self, request: empty_pb2.Empty, context: Any) -> machine_pb2.ServiceListResponse:
        infos = [self._machined_info()]
        sup = self.node.supervisor
        if sup is not None:
            infos += [service_info(st) for st in sup.list()]
        return machine_pb2.ServiceListResponse(
            messages=[machine_pb2.ServiceList(metadata=self._md(), services=infos)]
        )

    async def _control(self, id: str, verb: str, context: Any) -> Supervisor:
        if id == "machined":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f'service "machined" does not support {verb} via the API'
            )
        sup = self.node.supervisor
        if sup is None or id not in sup.names():
            await context.abort(grpc.StatusCode.NOT_FOUND, f'service "{id}" is not defined')
        assert sup is not None
        return sup

    @unary("ServiceStart")
    async def ServiceStart(
        self, request: machine_pb2.ServiceStartRequest, context: Any
    ) -> machine_pb2.ServiceStartResponse:
        sup = await self._control(request.id, "start", context)
        try:
            await sup.start(request.id)
        except (UnknownService, RuntimeError) as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        log_event(log, "service start requested", service=request.id)
        return machine_pb2.ServiceStartResponse(
            messages=[machine_pb2.ServiceStart(metadata=self._md(), resp=f'Service "{request.id}" started')]
        )

    @unary("ServiceStop")
    async def ServiceStop(
        self, request: machine_pb2.ServiceStopRequest, context: Any
    ) -> machine_pb2.ServiceStopResponse:
        sup = await self._control(request.id, "stop", context)
        await sup.stop(request.id)
        log_event(log, "service stop requested", service=request.id)
        return machine_pb2.ServiceStopResponse(
            messages=[machine_pb2.ServiceStop(metadata=self._md(), resp=f'Service "{request.id}" stopped')]
        )

    @unary("ServiceRestart")
    async def ServiceRestart(
        self, request: machine_pb2.ServiceRestartRequest, context: Any
    ) -> machine_pb2.ServiceRestartResponse:
        sup = await self._control(request.id, "restart", context)
        try:
            await sup.restart(request.id)
        except RuntimeError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        log_event(log, "service restart requested", service=request.id)
        return machine_pb2.ServiceRestartResponse(
            messages=[
                machine_pb2.ServiceRestart(metadata=self._md(), resp=f'Service "{request.id}" restarted')
            ]
        )

    # -- logs, events, dmesg --------------------------------------------------------------------

    @stream("Logs")
    async def Logs(self, request: machine_pb2.LogsRequest, context: Any) -> AsyncIterator[common_pb2.Data]:
        if request.namespace == K8S_NAMESPACE or request.driver == common_pb2.CRI:
            # talosctl logs -k: a Kubernetes container's logs; our nodes run none
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f'log "{request.id}" not found: this node runs no Kubernetes containers ({K8S_NAMESPACE})',
            )
        ring = self.node.log_ring(request.id)
        if ring is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f'log "{request.id}" not found')
        assert ring is not None
        tail = None if request.tail_lines < 0 else request.tail_lines
        if not request.follow:
            buf: list[str] = []
            size = 0
            for line in ring.tail(tail):
                buf.append(line.text)
                size += len(line.text) + 1
                if size >= CHUNK:
                    yield common_pb2.Data(metadata=self._md(), bytes=("\n".join(buf) + "\n").encode())
                    buf, size = [], 0
            if buf:
                yield common_pb2.Data(metadata=self._md(), bytes=("\n".join(buf) + "\n").encode())
            return
        async for line in ring.follow(tail):
            yield common_pb2.Data(metadata=self._md(), bytes=(line.text + "\n").encode())

    @stream("Events")
    async def Events(
        self, request: machine_pb2.EventsRequest, context: Any
    ) -> AsyncIterator[machine_pb2.Event]:
        sub = self.node.events.subscribe(
            tail_events=request.tail_events,
            tail_id=request.tail_id,
            tail_seconds=request.tail_seconds,
            actor_id=request.with_actor_id,
        )
        async with sub:
            yield machine_pb2.Event(metadata=self._md())  # "hello": the watch is established
            async for ev in sub:
                if request.with_actor_id and ev.actor_id != request.with_actor_id:
                    continue
                yield machine_pb2.Event(
                    metadata=self._md(),
                    data=any_pb2.Any(type_url=ev.type_url, value=ev.message.SerializeToString()),
                    id=ev.id,
                    actor_id=ev.actor_id,
                )

    @stream("Dmesg")
    async def Dmesg(self, request: machine_pb2.DmesgRequest, context: Any) -> AsyncIterator[common_pb2.Data]:
        try:
            fd = sysinfo.open_kmsg(self.kmsg, tail=request.tail)
        except sysinfo.KmsgUnavailable as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        try:
            async for batch in sysinfo.read_kmsg(fd, follow=request.follow):
                yield common_pb2.Data(metadata=self._md(), bytes=("\n".join(batch) + "\n").encode())
        except sysinfo.KmsgUnavailable as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    # -- diagnostics ---------------------------------------------------------------------------

    async def _read(self, fn: Callable[[], Any], what: str, context: Any) -> Any:
        try:
            return fn()
        except OSError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"reading {what}: {e.strerror or e}")

    @unary("Memory")
    async def Memory(self, request: empty_pb2.Empty, context: Any) -> machine_pb2.MemoryResponse:
        mem = await self._read(lambda: sysinfo.meminfo(self.proc), "/proc/meminfo", context)
        return machine_pb2.MemoryResponse(messages=[machine_pb2.Memory(metadata=self._md(), meminfo=mem)])

    @unary("LoadAvg")
    async def LoadAvg(self, request: empty_pb2.Empty, context: Any) -> machine_pb2.LoadAvgResponse:
        l1, l5, l15 = await self._read(lambda: sysinfo.loadavg(self.proc), "/proc/loadavg", context)
        return machine_pb2.LoadAvgResponse(
            messages=[machine_pb2.LoadAvg(metadata=self._md(), load1=l1, load5=l5, load15=l15)]
        )

    @unary("NetworkDeviceStats")
    async def NetworkDeviceStats(
        self, request: empty_pb2.Empty, context: Any
    ) -> machine_pb2.NetworkDeviceStatsResponse:
        total, devices = await self._read(lambda: sysinfo.netdev(self.proc), "/proc/net/dev", context)
        return machine_pb2.NetworkDeviceStatsResponse(
            messages=[machine_pb2.NetworkDeviceStats(metadata=self._md(), total=total, devices=devices)]
        )

    @unary("Netstat")
    async def Netstat(self, request: machine_pb2.NetstatRequest, context: Any) -> machine_pb2.NetstatResponse:
        if request.netns.allnetns or request.netns.netns:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "netns: only machined's own network namespace can be listed (hostnetwork)",
            )
        lp = request.l4proto
        protocols = [f.name for f, v in lp.ListFields() if v]
        records = await asyncio.to_thread(
            sysinfo.netstat,
            self.proc,
            filter=request.filter,
            protocols=protocols,
            with_pid=request.feature.pid,
        )
        return machine_pb2.NetstatResponse(
            messages=[machine_pb2.Netstat(metadata=self._md(), connectrecord=records)]
        )

    # -- lifecycle: not ours -------------------------------------------------------------------

    @unary("Reboot")
    async def Reboot(self, request: machine_pb2.RebootRequest, context: Any) -> machine_pb2.RebootResponse:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_OS)

    @unary("Shutdown")
    async def Shutdown(
        self, request: machine_pb2.ShutdownRequest, context: Any
    ) -> machine_pb2.ShutdownResponse:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_OS)

    @unary("Upgrade")
    async def Upgrade(self, request: machine_pb2.UpgradeRequest, context: Any) -> machine_pb2.UpgradeResponse:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_OS)

    @unary("Reset")
    async def Reset(self, request: machine_pb2.ResetRequest, context: Any) -> machine_pb2.ResetResponse:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_OS)

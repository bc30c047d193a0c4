"""Runtime resources (namespace ``runtime``): one Service per supervised service (plus ``machined``
itself) and the MachineStatus (stage and readiness with the unmet conditions), as Talos."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from machined.runtime import Controller, ControllerContext, Output, weak
from machined.services import ServiceState, Supervisor
from machined.state.catalog import KUBESPAN_PEER_STATUS, MACHINE_STATUS, NS_KUBESPAN, NS_RUNTIME, SERVICE

from .base import Outputs

MACHINED_SERVICE = "machined"
MACHINE_STATUS_ID = "machine"
_READY_STATES = ("Running", "Skipped", "Finished")


def service_spec(state: ServiceState, healthy: bool, unknown: bool, has_check: bool) -> dict[str, Any]:
    running = state is ServiceState.RUNNING
    if not has_check:  # nothing to probe: a running service is as healthy as it gets
        healthy, unknown = running, False
    return {"running": running, "healthy": running and healthy, "unknown": unknown, "state": str(state)}


class ServiceController(Controller):
    name = "runtime.ServiceController"
    outputs = (Output(SERVICE),)
    interval = 30.0

    def __init__(self, supervisor: Callable[[], Supervisor | None]) -> None:
        self.supervisor = supervisor
        self.out = Outputs(NS_RUNTIME, SERVICE)

    async def reconcile(self, ctx: ControllerContext) -> None:
        await self.out.put(
            ctx, MACHINED_SERVICE, {"running": True, "healthy": True, "unknown": False, "state": "Running"}
        )
        sup = self.supervisor()
        for st in sup.list() if sup is not None else ():
            await self.out.put(
                ctx,
                st.name,
                service_spec(st.state, st.health.healthy, st.health.unknown, st.has_health_check),
            )
        await self.out.cleanup(ctx)


class MachineStatusController(Controller):
    """Services + peer statuses -> MachineStatus. Ready when every service is running and healthy (or
    skipped, or finished by design) and every mesh peer is up; otherwise the unmet conditions say why."""

    name = "runtime.MachineStatusController"
    inputs = (weak(NS_RUNTIME, SERVICE), weak(NS_KUBESPAN, KUBESPAN_PEER_STATUS))
    outputs = (Output(MACHINE_STATUS),)

    def __init__(self, stage: Callable[[], str]) -> None:
        self.stage = stage
        self.out = Outputs(NS_RUNTIME, MACHINE_STATUS)

    async def reconcile(self, ctx: ControllerContext) -> None:
        unmet: list[dict[str, str]] = []
        stage = self.stage()
        if stage != "running":
            unmet.append({"name": "stage", "reason": f"machined is {stage}"})
        bad = []
        for r in await ctx.list(NS_RUNTIME, SERVICE):
            s = r.spec
            if s.get("state") not in _READY_STATES or (s.get("running") and not s.get("healthy")):
                bad.append(r.metadata.id)
        if bad:
            unmet.append({"name": "services", "reason": f"unhealthy services: {', '.join(sorted(bad))}"})
        down = [
            r.spec.get("label") or r.metadata.id[:12]
            for r in await ctx.list(NS_KUBESPAN, KUBESPAN_PEER_STATUS)
            if r.spec.get("state") != "up"
        ]
        if down:
            unmet.append({"name": "mesh", "reason": f"peers not up: {', '.join(sorted(down))}"})
        await self.out.put(
            ctx,
            MACHINE_STATUS_ID,
            {"stage": stage, "status": {"ready": not unmet, "unmetConditions": unmet}},
        )
        await self.out.cleanup(ctx)

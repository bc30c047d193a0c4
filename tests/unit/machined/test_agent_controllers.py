"""machined's controllers on a real runtime and state: unchanged inputs write nothing, derived
resources follow their inputs, cleanup removes what is no longer produced."""

from __future__ import annotations

from kubespan.snapshot import PeerStatus
from kubespan.testing import peer_status
from machined.controllers import (
    KubeSpanPeerStatusController,
    MachineStatusController,
    MemberController,
    Outputs,
    rfc3339,
)
from machined.runtime import Controller, ControllerContext, Output, Runtime
from machined.state import DEFINITIONS, EventType, Resource, State, register_all
from machined.state.catalog import (
    AFFILIATE,
    KUBESPAN_PEER_STATUS,
    MACHINE_STATUS,
    MEMBER,
    NS_CLUSTER,
    NS_KUBESPAN,
    NS_RUNTIME,
    SERVICE,
)
from spanutil.testing import eventually


def state() -> State:
    s = State()
    register_all(s, DEFINITIONS)
    return s


async def settle(rt: Runtime, name: str, runs: int) -> None:
    await eventually(lambda: rt.stats()[name].runs >= runs and rt.stats()[name].state == "idle")


async def _gone(s: State, *key: str) -> bool:
    return await s.find(*key) is None


async def _ready(s: State) -> bool:
    return (await s.get(NS_RUNTIME, MACHINE_STATUS, "machine")).spec["status"]["ready"]


def peer(
    label: str, state: str, rx: int = 0, endpoint: str = "10.0.0.1:51820", rtt: float | None = None
) -> PeerStatus:
    return peer_status(
        label,
        public_key=f"{label}-key=",
        endpoint=endpoint,
        state=state,
        rx_bytes=rx,
        tx_bytes=rx,
        last_handshake=1_700_000_000.0,
        rtt=rtt,
    )


class Host:
    def __init__(self) -> None:
        self.views: list[PeerStatus] = []

    def peers(self) -> tuple[PeerStatus, ...]:
        return tuple(self.views)


async def test_peer_statuses_are_written_only_when_they_change_and_cleaned_up():
    s, host = state(), Host()
    host.views = [peer("a", "up"), peer("b", "unknown")]
    rt = Runtime(s)
    c = KubeSpanPeerStatusController(host)  # type: ignore[arg-type]
    c.counter_refresh = 0
    rt.register(c)
    w = s.watch(NS_KUBESPAN, KUBESPAN_PEER_STATUS, bootstrap=False)
    async with rt:
        await settle(rt, c.name, 1)
        for _ in range(3):  # nothing changed: no writes, no events
            rt.wake(c.name)
        await settle(rt, c.name, 2)
        assert w.pending() == 2
        host.views = [peer("a", "up", rx=100)]
        rt.wake(c.name)
        await settle(rt, c.name, 3)
    kinds = []
    while w.pending():
        e = await anext(w)
        kinds.append((e.type, e.resource.spec["label"]))
    assert kinds == [
        (EventType.CREATED, "a"),
        (EventType.CREATED, "b"),
        (EventType.UPDATED, "a"),
        (EventType.DESTROYED, "b"),
    ]
    a = await s.get(NS_KUBESPAN, KUBESPAN_PEER_STATUS, "a-key=")
    assert a.spec["receiveBytes"] == 100 and a.spec["lastHandshakeTime"] == rfc3339(1_700_000_000.0)
    assert a.spec["lastUsedEndpoint"] == "" and a.spec["lastEndpointChange"] is None


async def test_counter_only_changes_are_batched_state_changes_are_not():
    s, host, now = state(), Host(), [100.0]
    host.views = [peer("a", "up")]
    rt = Runtime(s)
    c = KubeSpanPeerStatusController(host, clock=lambda: now[0])  # type: ignore[arg-type]
    rt.register(c)

    async def rx() -> int:
        return (await s.get(NS_KUBESPAN, KUBESPAN_PEER_STATUS, "a-key=")).spec["receiveBytes"]

    async with rt:
        await settle(rt, c.name, 1)
        host.views = [peer("a", "up", rx=10)]
        now[0] += 1
        rt.wake(c.name)
        await settle(rt, c.name, 2)
        assert await rx() == 0  # counters only, 1 s after the last write: not yet
        now[0] += 5
        rt.wake(c.name)
        await settle(rt, c.name, 3)
        assert await rx() == 10  # refreshed
        host.views = [peer("a", "down", rx=11)]
        now[0] += 0.1
        rt.wake(c.name)
        await settle(rt, c.name, 4)
        r = await s.get(NS_KUBESPAN, KUBESPAN_PEER_STATUS, "a-key=")
        assert r.spec["state"] == "down" and r.spec["receiveBytes"] == 11  # a state change: at once


async def test_peer_status_spec_carries_the_round_trip_null_until_one_is_measured():
    s, host, now = state(), Host(), [100.0]
    host.views = [peer("a", "up")]
    rt = Runtime(s)
    c = KubeSpanPeerStatusController(host, clock=lambda: now[0])  # type: ignore[arg-type]
    rt.register(c)

    async def spec() -> dict:
        return (await s.get(NS_KUBESPAN, KUBESPAN_PEER_STATUS, "a-key=")).spec

    async with rt:
        await settle(rt, c.name, 1)
        assert "rtt" in await spec() and (await spec())["rtt"] is None, "no probe answered: null, not 0"
        host.views = [peer("a", "up", rtt=0.0123)]
        now[0] += 1
        rt.wake(c.name)
        await settle(rt, c.name, 2)
        assert (await spec())["rtt"] is None, "a round trip change alone waits for the refresh"
        now[0] += 5
        rt.wake(c.name)
        await settle(rt, c.name, 3)
        assert (await spec())["rtt"] == 0.0123


async def test_members_follow_affiliates():
    s = state()
    rt = Runtime(s)
    rt.register(MemberController())
    await s.create(
        Resource.new(
            NS_CLUSTER,
            AFFILIATE,
            "id1",
            {
                "nodeId": "id1",
                "nodename": "n1",
                "hostname": "h1",
                "addresses": ["10.0.0.1"],
                "machineType": "worker",
                "operatingSystem": "x",
            },
        ),
        owner="test",
    )
    async with rt:
        await settle(rt, MemberController.name, 1)
        m = await s.get(NS_CLUSTER, MEMBER, "n1")
        assert m.spec == {
            "nodeId": "id1",
            "addresses": ["10.0.0.1"],
            "hostname": "h1",
            "machineType": "worker",
            "operatingSystem": "x",
        }
        await s.destroy(NS_CLUSTER, AFFILIATE, "id1", owner="test")
        await eventually(lambda: _gone(s, NS_CLUSTER, MEMBER, "n1"))


async def test_machine_status_names_what_is_unmet():
    s = state()
    stage = ["booting"]
    rt = Runtime(s)
    c = MachineStatusController(lambda: stage[0])
    rt.register(c)
    for sid, unknown, service_state in (("etcd", True, "Waiting"), ("job", False, "Finished")):
        spec = {"running": False, "healthy": False, "unknown": unknown, "state": service_state}
        await s.create(Resource.new(NS_RUNTIME, SERVICE, sid, spec), owner="t")
    await s.create(
        Resource.new(NS_KUBESPAN, KUBESPAN_PEER_STATUS, "k", {"label": "n2", "state": "down"}), owner="t"
    )
    async with rt:
        await settle(rt, c.name, 1)
        ms = await s.get(NS_RUNTIME, MACHINE_STATUS, "machine")
        assert ms.spec == {
            "stage": "booting",
            "status": {
                "ready": False,
                "unmetConditions": [
                    {"name": "stage", "reason": "machined is booting"},
                    {"name": "services", "reason": "unhealthy services: etcd"},
                    {"name": "mesh", "reason": "peers not up: n2"},
                ],
            },
        }
        stage[0] = "running"
        r = await s.get(NS_RUNTIME, SERVICE, "etcd")
        r.spec = {"running": True, "healthy": True, "unknown": False, "state": "Running"}
        await s.update(r, owner="t")
        r = await s.get(NS_KUBESPAN, KUBESPAN_PEER_STATUS, "k")
        r.spec = {"label": "n2", "state": "up"}
        await s.update(r, owner="t")
        await eventually(lambda: _ready(s))


async def test_outputs_keep_all_protects_from_cleanup():
    s = state()

    class C(Controller):
        name = "test.C"
        outputs = (Output(SERVICE),)

        def __init__(self) -> None:
            self.out = Outputs(NS_RUNTIME, SERVICE)
            self.skip = False

        async def reconcile(self, ctx: ControllerContext) -> None:
            if self.skip:
                self.out.keep_all(ctx)
            else:
                await self.out.put(ctx, "x", {"running": True})
            await self.out.cleanup(ctx)

    c = C()
    rt = Runtime(s)
    rt.register(c)
    async with rt:
        await settle(rt, c.name, 1)
        c.skip = True
        rt.wake(c.name)
        await settle(rt, c.name, 2)
        assert await s.find(NS_RUNTIME, SERVICE, "x") is not None

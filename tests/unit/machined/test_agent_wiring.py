"""The agent wired on fakes: config boot, the mesh first, resources, services gated on the mesh,
config changes applied per ChangeEffects, and shutdown order."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from machined.config import ApplyMode
from machined.config.testing import ManualTimer, config_yaml, new_secret
from machined.daemon import Agent, AgentError, AgentOptions, StaticNetInfo
from machined.daemon.testing import FakeMeshWorld, remote_affiliate
from machined.services import ServiceState
from machined.services.fake import FakeSpawner
from machined.state import Resource
from machined.state.catalog import (
    AFFILIATE,
    IDENTITY,
    KUBESPAN_CONFIG,
    KUBESPAN_ENDPOINT,
    KUBESPAN_IDENTITY,
    KUBESPAN_NAT_STATUS,
    KUBESPAN_PEER_SPEC,
    KUBESPAN_PEER_STATUS,
    LINK_STATUS,
    MACHINE_CONFIG,
    MACHINE_STATUS,
    MEMBER,
    NODE_ADDRESS,
    NS_CLUSTER,
    NS_CONFIG,
    NS_KUBESPAN,
    NS_NETWORK,
    NS_RUNTIME,
    SERVICE,
)
from spanapi.talos.machine import machine_pb2
from spanutil.testing import eventually

CLUSTER = "agent-test-cluster"
SECRET = new_secret()
T = 10.0  # generous bound on every wait


def cfg(**kw: Any) -> str:
    kw.setdefault("agent", {"nodename": "n1", "httpStatusAddr": ""})
    return config_yaml(cluster_id=CLUSTER, secret=SECRET, **kw)


@pytest.fixture
def world() -> FakeMeshWorld:
    return FakeMeshWorld()


@pytest.fixture
def spawner() -> FakeSpawner:
    return FakeSpawner()


@pytest.fixture
def netinfo() -> StaticNetInfo:
    n = StaticNetInfo(link_specs={"eth0": {"index": 2, "type": "ether", "kind": "", "mtu": 1500}})
    n.add_address("eth0", "10.5.0.1/24")
    n.add_address("lo", "127.0.0.1/8", scope="host")
    n.add_address("kubespan", "fd00::1/64")
    return n


@pytest.fixture
async def make(
    tmp_path: Path, world: FakeMeshWorld, spawner: FakeSpawner, netinfo: StaticNetInfo
) -> AsyncIterator[Callable[..., Any]]:
    agents: list[Agent] = []

    async def make(
        text: str | None = None, *, start: bool = True, state: str = "state", **opts: Any
    ) -> Agent:
        path = None
        if text is not None:
            path = tmp_path / "config.yaml"
            path.write_text(text)
        timer = opts.pop("timer", None)
        a = Agent(
            AgentOptions(
                state_dir=tmp_path / state, config_path=path, serve_api=False, serve_http=False, **opts
            ),
            mesh_factory=world,
            spawner=spawner,
            netinfo=netinfo,
            timer=timer,
            mesh_poll=0.02,
        )
        agents.append(a)
        if start:
            await a.start()
        return a

    yield make
    world.stop()
    for a in agents:
        await a.stop()


async def find(a: Agent, ns: str, type: str, id: str) -> Resource | None:
    return await a.state.find(ns, type, id)


async def listed(a: Agent, ns: str, type: str) -> list[Resource]:
    return await a.state.list(ns, type)


# --- config boot -----------------------------------------------------------------------------------


async def test_initial_config_is_persisted_and_the_persisted_one_wins_later(make, tmp_path):
    a = await make(cfg())
    assert (tmp_path / "state" / "config.yaml").exists()
    assert a.config.running is not None and a.hostname == "n1"
    await a.stop()
    # the file changes (another nodename) but the persisted config wins at the next start
    b = await make(cfg(agent={"nodename": "changed", "httpStatusAddr": ""}))
    assert b.hostname == "n1"
    assert any("Starting machined" in e.message for e in b.machined_events)


async def test_an_invalid_file_is_ignored_when_a_config_is_persisted(make, tmp_path):
    a = await make(cfg())
    await a.stop()
    b = await make("version: v1alpha1\nmachine: {type: nonsense}\n")
    assert b.hostname == "n1"
    kinds = [e.message.DESCRIPTOR.name for e in b.events.history(tail_events=-1)]
    assert "ConfigLoadErrorEvent" in kinds


async def test_without_any_config_the_agent_refuses_to_start(make):
    a = await make(None, start=False)
    with pytest.raises(AgentError, match="no config"):
        await a.start()
    b = await make("version: v1alpha1\nmachine: {type: nonsense}\n", start=False, state="other")
    with pytest.raises(AgentError, match=r"machine\.type"):
        await b.start()


# --- the mesh as resources -----------------------------------------------------------------------------


async def test_mesh_state_is_published_as_talos_resources(make, world):
    k1, d1 = remote_affiliate(CLUSTER, 1, "10.5.0.2", name="n2")
    world.discovery.put(d1)
    a = await make(cfg())
    world.set_peers_alive()
    st = await eventually(lambda: find(a, NS_KUBESPAN, KUBESPAN_PEER_STATUS, k1.b64), "peer status published")
    st = await eventually(
        lambda: _with(find(a, NS_KUBESPAN, KUBESPAN_PEER_STATUS, k1.b64), lambda r: r.spec["state"] == "up"),
        "peer up",
    )
    assert set(st.spec) == {
        "label",
        "endpoint",
        "state",
        "receiveBytes",
        "transmitBytes",
        "lastHandshakeTime",
        "lastUsedEndpoint",
        "lastEndpointChange",
        "natClass",  # ours: the class the peer publishes
        "path",  # ours (issue 14): lan | direct | relay | none
        "relayVia",
        "whyNotDirect",
        "connectTime",
        "rtt",  # ours (issue 17): the smoothed probe round trip, null until a probe is answered
    }
    assert st.spec["natClass"] == "unknown"  # the remote publishes no traversal field
    assert st.spec["path"] == "lan" and st.spec["relayVia"] == "" and st.spec["whyNotDirect"] == ""
    assert st.spec["label"] == "n2" and st.spec["endpoint"] == "10.5.0.2:51820"
    assert st.spec["receiveBytes"] > 0 and st.spec["lastHandshakeTime"].endswith("Z")

    spec = await find(a, NS_KUBESPAN, KUBESPAN_PEER_SPEC, k1.b64)
    assert spec is not None and spec.spec["label"] == "n2" and "10.5.0.2/32" in spec.spec["allowedIPs"]
    ident = await find(a, NS_KUBESPAN, KUBESPAN_IDENTITY, "local")
    assert ident is not None and ident.spec["address"].endswith("/128")
    assert ident.spec["publicKey"] == world.mesh.identity.public_key.b64
    assert a.state.definition(KUBESPAN_IDENTITY).sensitive
    nat = await find(a, NS_KUBESPAN, KUBESPAN_NAT_STATUS, "local")
    assert nat is not None and nat.spec["natClass"] == "unknown"
    assert nat.spec["error"] == "STUN: no responder configured"  # no stunServers in the config
    assert not a.state.definition(KUBESPAN_NAT_STATUS).sensitive

    ksc = await eventually(lambda: find(a, NS_CONFIG, KUBESPAN_CONFIG, "kubespan"), "kubespan config")
    assert ksc.spec["enabled"] and ksc.spec["clusterId"] == CLUSTER and ksc.spec["mtu"] == 1420
    assert await find(a, NS_CONFIG, MACHINE_CONFIG, "v1alpha1") is not None

    # the cluster namespace: this node and the remote one, as affiliates and members
    affiliates = await eventually(
        lambda: _len(listed(a, NS_CLUSTER, AFFILIATE), 2), "two affiliates (local and remote)"
    )
    assert {r.metadata.id for r in affiliates} == {"node-0001", world.mesh.node_id}
    members = await eventually(lambda: _len(listed(a, NS_CLUSTER, MEMBER), 2), "two members")
    assert {r.metadata.id for r in members} == {"n1", "n2"}
    # harvested endpoint of the up peer
    ep = await eventually(lambda: find(a, NS_KUBESPAN, KUBESPAN_ENDPOINT, k1.b64), "endpoint")
    assert ep.spec == {"affiliateID": "node-0001", "endpoint": "10.5.0.2:51820"}

    # a peer leaving discovery disappears from the resources
    world.discovery.remove("node-0001")
    await eventually(
        lambda: _none(find(a, NS_KUBESPAN, KUBESPAN_PEER_STATUS, k1.b64)), "peer status destroyed"
    )
    await eventually(lambda: _len(listed(a, NS_CLUSTER, MEMBER), 1), "member gone")


async def test_peer_status_goes_down_when_the_peer_stops_answering(make, world):
    k1, d1 = remote_affiliate(CLUSTER, 1, "10.5.0.2")
    world.discovery.put(d1)
    a = await make(cfg())
    world.set_peers_alive()
    await eventually(
        lambda: _with(find(a, NS_KUBESPAN, KUBESPAN_PEER_STATUS, k1.b64), lambda r: r.spec["state"] == "up"),
        "up",
    )
    watch = a.state.watch(NS_KUBESPAN, KUBESPAN_PEER_STATUS, k1.b64, bootstrap=False)
    world.set_peers_alive(False)  # no more handshakes or probe answers
    states: list[str] = []

    async def until_down() -> None:
        async for ev in watch:
            states.append(ev.resource.spec["state"])
            if states[-1] == "down":
                return

    async with asyncio.timeout(T):
        await until_down()
    watch.close()
    ms = await eventually(
        lambda: _with(
            find(a, NS_RUNTIME, MACHINE_STATUS, "machine"), lambda r: not r.spec["status"]["ready"]
        ),
        "machine not ready",
    )
    assert any(c["name"] == "mesh" for c in ms.spec["status"]["unmetConditions"])


async def test_network_status_and_node_addresses(make):
    a = await make(cfg())
    link = await eventually(lambda: find(a, NS_NETWORK, LINK_STATUS, "eth0"), "link status")
    assert link.spec["type"] == "ether"
    routed = await eventually(lambda: find(a, NS_NETWORK, NODE_ADDRESS, "routed"), "node addresses")
    # sortAlgorithm: Talos's name of the order (v1: IPv4 first, by address, then prefix length)
    assert routed.spec == {"addresses": ["10.5.0.1/24"], "sortAlgorithm": "v1"}
    current = await find(a, NS_NETWORK, NODE_ADDRESS, "current")
    assert current.spec["addresses"] == ["10.5.0.1/24", "fd00::1/64"]  # the mesh link counts as current
    default = await find(a, NS_NETWORK, NODE_ADDRESS, "default")
    assert default.spec == {"addresses": ["10.5.0.1/24"], "sortAlgorithm": "v1"}


# --- the node identity ---------------------------------------------------------------------------------


async def test_node_identity_is_the_affiliate_id_and_survives_a_restart(make, world, tmp_path):
    a = await make(cfg())
    ident = await eventually(lambda: find(a, NS_CLUSTER, IDENTITY, "local"), "node identity")
    node_id = ident.spec["nodeId"]
    assert set(ident.spec) == {"nodeId"}
    assert re.fullmatch(r"[0-9A-Za-z]{30,43}", node_id)  # base62 of 32 random bytes
    assert node_id == world.mesh.node_id  # the id this node publishes to discovery
    local = await eventually(lambda: find(a, NS_CLUSTER, AFFILIATE, node_id), "local affiliate")
    assert local.spec["nodeId"] == node_id
    assert not a.state.definition(IDENTITY).sensitive
    await a.stop()
    b = await make(cfg())
    again = await eventually(lambda: find(b, NS_CLUSTER, IDENTITY, "local"), "node identity again")
    assert again.spec == {"nodeId": node_id}


async def test_node_identity_is_served_through_the_resource_api(make, tmp_path):
    """Over the machine API socket (real gRPC): the resource API by alias, and spanctl's table with
    Talos's ID column."""
    from machined.api.server import serve
    from machined.spanctl import main as spanctl
    from spanapi.talos.cosi import state_pb2, state_pb2_grpc

    a = await make(cfg())
    ident = await eventually(lambda: find(a, NS_CLUSTER, IDENTITY, "local"), "node identity")
    path = tmp_path / "api" / "machine.sock"
    server = await serve(a, path)
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as ch:
            r = await state_pb2_grpc.StateStub(ch).Get(
                state_pb2.GetRequest(type="identities", id="local"), metadata=(("talos-role", "os:reader"),)
            )
        md = r.resource.metadata
        assert (md.namespace, md.type, md.id) == ("cluster", IDENTITY, "local")
        assert yaml.safe_load(r.resource.spec.yaml_spec) == {"nodeId": ident.spec["nodeId"]}
        out, err = io.StringIO(), io.StringIO()
        rc = await asyncio.to_thread(spanctl.main, ["--socket", str(path), "get", "identities"], out, err)
        assert rc == 0, err.getvalue()
        header, row = out.getvalue().splitlines()
        assert header.split() == ["NODE", "NAMESPACE", "TYPE", "ID", "VERSION", "ID"]
        assert row.split()[1:4] == ["cluster", "Identities", "local"]
        assert row.split()[-1] == ident.spec["nodeId"]
    finally:
        await server.stop(0)


async def test_node_identity_without_the_mesh(make, tmp_path):
    a = await make(cfg(kubespan=False), state="nomesh")
    ident = await eventually(lambda: find(a, NS_CLUSTER, IDENTITY, "local"), "node identity")
    assert ident.spec["nodeId"] == (tmp_path / "nomesh" / "node-id").read_text().strip()


# --- services and the mesh -------------------------------------------------------------------------


async def test_a_service_that_requires_the_mesh_waits_for_a_peer(make, world, spawner):
    svc = {"name": "etcd", "command": "etcd", "requiresMesh": {"quorum": 1}, "restart": "always"}
    _, d1 = remote_affiliate(CLUSTER, 1, "10.5.0.2")
    world.discovery.put(d1)
    a = await make(cfg(services=[svc]))
    st = await eventually(
        lambda: a.supervisor.status("etcd").state is ServiceState.WAITING and a.supervisor.status("etcd"),
        "waiting",
    )
    assert "mesh" in st.message and not spawner.of("etcd")
    world.set_peers_alive()
    await eventually(lambda: a.supervisor.status("etcd").state is ServiceState.RUNNING, "running")
    assert len(spawner.of("etcd")) == 1
    res = await eventually(
        lambda: _with(find(a, NS_RUNTIME, SERVICE, "etcd"), lambda r: r.spec["running"]), "service resource"
    )
    assert res.spec == {"running": True, "healthy": True, "unknown": False, "state": "Running"}
    machined = await find(a, NS_RUNTIME, SERVICE, "machined")
    assert machined is not None and machined.spec["running"]
    # service state events are machine events
    evs = [e.message for e in a.events.history(tail_events=-1)]
    assert any(
        isinstance(m, machine_pb2.ServiceStateEvent) and m.service == "etcd" and m.action == m.RUNNING
        for m in evs
    )
    ms = await eventually(
        lambda: _with(find(a, NS_RUNTIME, MACHINE_STATUS, "machine"), lambda r: r.spec["status"]["ready"]),
        "machine ready",
    )
    assert ms.spec["stage"] == "running"
    assert any(
        isinstance(m, machine_pb2.MachineStatusEvent)
        for m in (e.message for e in a.events.history(tail_events=-1))
    )


async def test_mesh_start_with_an_invalid_setting_fails_fast(make, world, monkeypatch):
    import machined.daemon.meshhost as mh
    from kubespan.constants import ConfigError

    monkeypatch.setattr(mh, "RETRY_INITIAL", 0.01)
    world.fail_next = 100
    world.fail_error = ConfigError("ifname", "'ks\u00e9' must be 1..15 characters of printable ASCII")
    a = await make(cfg())
    assert not a.meshhost.running and "ifname" in a.meshhost.last_error
    await asyncio.sleep(0.2)
    assert world.fail_next == 99, "a configuration error is not retried"
    assert not a.meshhost.retrying
    messages = [e.message for e in a.machined_events]
    assert any("Mesh failed to start" in m and "ifname" in m and "retrying" not in m for m in messages)


async def test_mesh_start_failure_is_retried_and_services_wait(make, world, spawner, monkeypatch):
    import machined.daemon.meshhost as mh

    monkeypatch.setattr(mh, "RETRY_INITIAL", 0.05)
    world.fail_next = 2
    svc = {"name": "app", "command": "app", "requiresMesh": "ready"}
    a = await make(cfg(services=[svc]))
    assert not a.meshhost.running and a.meshhost.last_error
    await eventually(lambda: a.supervisor.status("app").state is ServiceState.WAITING, "waiting")
    await eventually(lambda: a.meshhost.running, "mesh started on retry")
    # no peers: "ready" holds vacuously once the engine runs
    await eventually(lambda: a.supervisor.status("app").state is ServiceState.RUNNING, "service started")


# --- config changes -------------------------------------------------------------------------------------


async def test_applied_config_changes_services_per_change_effects(make, spawner):
    one = {"name": "one", "command": "one"}
    two = {"name": "two", "command": "two", "dependsOn": ["one"]}
    a = await make(cfg(services=[one, two]))
    await eventually(lambda: a.supervisor.status("two").state is ServiceState.RUNNING, "two running")
    first_one = spawner.of("one")[0]

    # two changes (restart it alone), three is added, one untouched
    three = {"name": "three", "command": "three"}
    two_b = {**two, "args": ["--flag"]}
    r = a.config.apply(cfg(services=[one, two_b, three]), ApplyMode.NO_REBOOT)
    assert r.effects.services_changed == ("two",) and r.effects.services_added == ("three",)
    await a.settled()
    await eventually(lambda: a.supervisor.status("three").state is ServiceState.RUNNING, "three running")
    await eventually(lambda: a.supervisor.status("two").state is ServiceState.RUNNING, "two restarted")
    assert spawner.of("two")[-1].cmd.argv == ("two", "--flag")
    assert first_one.alive and len(spawner.of("one")) == 1

    # removing one and two (two depends on one): both stopped and forgotten
    a.config.apply(cfg(services=[three]), ApplyMode.NO_REBOOT)
    await a.settled()
    assert set(a.supervisor.names()) == {"three"}
    assert not first_one.alive
    await eventually(lambda: _none(find(a, NS_RUNTIME, SERVICE, "one")), "service resource removed")
    assert any("Config apply" in e.message for e in a.machined_events)


async def test_mesh_is_rebuilt_and_cleaned_up_when_the_link_changes(make, world):
    a = await make(cfg())
    first = world.runners[-1]
    links1 = world.links
    a.config.apply(cfg(agent={"nodename": "n1", "httpStatusAddr": "", "wireguard": {"linkName": "ks2"}}))
    await a.settled()
    assert len(world.runners) == 2 and a.meshhost.runner is world.runners[-1]
    assert not first.started and world.discovery.deleted == 1  # left the cluster: cleanup
    assert not links1.rules and not links1.routes  # the old rules and routes were removed
    assert world.links.ifname == "ks2"
    # an MTU change rebuilds without cleanup (kernel objects keep their names)
    a.config.apply(
        config_yaml(
            cluster_id=CLUSTER,
            secret=SECRET,
            agent={"nodename": "n1", "httpStatusAddr": "", "wireguard": {"linkName": "ks2"}},
        ).replace("enabled: true", "enabled: true\nmtu: 1380")
    )
    await a.settled()
    assert len(world.runners) == 3 and world.discovery.deleted == 1
    assert world.runners[-1].mesh.cfg.mtu == 1380


async def test_try_apply_rolls_back(make, spawner):
    timer = ManualTimer()
    a = await make(cfg(), timer=timer)
    r = a.config.apply(cfg(services=[{"name": "tmp", "command": "tmp"}]), ApplyMode.TRY, try_timeout=30)
    assert r.pending is not None
    await a.settled()
    await eventually(lambda: a.supervisor.status("tmp").state is ServiceState.RUNNING, "tried service up")
    timer.advance(31)
    await a.settled()
    assert "tmp" not in a.supervisor.names()
    assert any("Config rollback" in e.message for e in a.machined_events)


# --- shutdown ------------------------------------------------------------------------------------------


async def test_stop_stops_services_then_the_mesh_with_cleanup(make, world, spawner):
    a = await make(cfg(services=[{"name": "svc", "command": "svc"}]))
    await eventually(lambda: a.supervisor.status("svc").state is ServiceState.RUNNING, "running")
    order: list[str] = []
    proc = spawner.of("svc")[0]
    runner = world.runners[-1]
    orig = runner.stop

    async def stop(**kw: Any) -> None:
        order.append(f"mesh alive={proc.alive}")
        await orig(**kw)

    runner.stop = stop  # type: ignore[method-assign]
    await a.stop()
    assert order == ["mesh alive=False"]
    assert world.discovery.deleted == 1 and world.wg.closed and world.wg.removed_on_close
    assert a.supervisor.status("svc").state is ServiceState.FINISHED


async def test_keep_on_exit_keeps_the_mesh_state(make, world):
    a = await make(cfg(), keep_on_exit=True)
    await a.stop()
    assert world.discovery.deleted == 0 and not world.wg.removed_on_close
    assert world.links.rules  # rules and routes stay for the next start


# --- helpers ---------------------------------------------------------------------------------------------


async def _with(aw: Any, pred: Callable[[Resource], bool]) -> Resource | None:
    r = await aw
    return r if r is not None and pred(r) else None


async def _len(aw: Any, n: int) -> list[Resource] | None:
    rs = await aw
    return rs if len(rs) == n else None


async def _none(aw: Any) -> bool:
    return (await aw) is None

"""cosi.resource.State servicer (Get/List/Watch, read-only, sensitivity) and the API server on a unix
socket (write verbs refused, roles over the wire, socket permissions, stale sockets)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import empty_pb2

from machined.api import WRITE_DENIED, StateServicer
from machined.api.server import SocketInUse, serve
from machined.api.testing import Aborted, FakeContext, collect
from machined.apid.testing import FakeNode
from machined.config import MachineConfig
from machined.config.testing import config_yaml
from machined.state import DEFINITIONS, Resource, State, register_all
from machined.state.catalog import (
    KUBESPAN_IDENTITY,
    KUBESPAN_PEER_STATUS,
    MACHINE_CONFIG,
    NS_CONFIG,
    NS_KUBESPAN,
)
from spanapi.talos.cosi import resource_pb2, state_pb2, state_pb2_grpc
from spanapi.talos.machine import machine_pb2, machine_pb2_grpc
from spanapi.talos.resource.definitions.enums import enums_pb2
from spanapi.talos.resource.definitions.kubespan import kubespan_pb2

READER = ["os:reader"]
T = 5.0


def peer(i: int, state: str = "up", **labels: str) -> Resource:
    return Resource.new(
        NS_KUBESPAN,
        KUBESPAN_PEER_STATUS,
        f"key{i}=",
        {"label": f"n{i}", "endpoint": f"10.0.0.{i}:51820", "state": state, "receiveBytes": i},
        labels=labels,
    )


@pytest.fixture
async def state() -> State:
    s = State()
    register_all(s, DEFINITIONS)
    for i in (1, 2, 3):
        await s.create(peer(i, zone="a" if i < 3 else "b"), owner="ctl")
    await s.create(
        Resource.new(NS_KUBESPAN, KUBESPAN_IDENTITY, "local", {"privateKey": "PRIVATE", "publicKey": "pub"}),
        owner="ctl",
    )
    return s


@pytest.fixture
def api(state: State) -> StateServicer:
    return StateServicer(state)


async def aborted(aw: Any) -> Aborted:
    with pytest.raises(Aborted) as e:
        if hasattr(aw, "__anext__"):
            await collect(aw, limit=1)
        else:
            await aw
    return e.value


def spec(r: resource_pb2.Resource) -> Any:
    return yaml.safe_load(r.spec.yaml_spec)


# --- Get / List -------------------------------------------------------------------------------------------


async def test_get_by_type_or_alias_in_the_default_namespace(api):
    for t in (
        KUBESPAN_PEER_STATUS,
        "kubespanpeerstatuses",
        "KubeSpanPeerStatus",
        "kubespanpeerstatuses.kubespan",
    ):
        r = (await api.Get(state_pb2.GetRequest(type=t, id="key2="), FakeContext(READER))).resource
        md = r.metadata
        assert (md.namespace, md.type, md.id, md.version, md.owner, md.phase) == (
            NS_KUBESPAN, KUBESPAN_PEER_STATUS, "key2=", "1", "ctl", "running",
        )  # fmt: skip
        assert md.created.seconds > 0 and spec(r)["label"] == "n2"
        talos = kubespan_pb2.PeerStatusSpec.FromString(r.spec.proto_spec)  # what talosctl decodes
        assert (talos.label, talos.state, talos.receive_bytes) == ("n2", enums_pb2.PEER_STATE_UP, 2)
    e = await aborted(api.Get(state_pb2.GetRequest(type=KUBESPAN_PEER_STATUS, id="nope"), FakeContext()))
    assert e.code is grpc.StatusCode.NOT_FOUND and "doesn't exist" in e.details
    e = await aborted(api.Get(state_pb2.GetRequest(type="Frobs.example.com", id="x"), FakeContext()))
    assert e.code is grpc.StatusCode.NOT_FOUND and "not registered" in e.details
    e = await aborted(
        api.Get(state_pb2.GetRequest(namespace="nowhere", type=KUBESPAN_PEER_STATUS, id="x"), FakeContext())
    )
    assert e.code is grpc.StatusCode.NOT_FOUND and "namespace" in e.details


async def test_sensitive_types_need_the_admin_role(api):
    req = state_pb2.GetRequest(type=KUBESPAN_IDENTITY, id="local")
    for ctx in (FakeContext(READER), FakeContext(["os:operator"])):
        e = await aborted(api.Get(req, ctx))
        assert e.code is grpc.StatusCode.PERMISSION_DENIED and "os:admin" in e.details
    e = await aborted(api.List(state_pb2.ListRequest(type=KUBESPAN_IDENTITY), FakeContext(READER)))
    assert e.code is grpc.StatusCode.PERMISSION_DENIED
    e = await aborted(api.Watch(state_pb2.WatchRequest(type=KUBESPAN_IDENTITY), FakeContext(READER)))
    assert e.code is grpc.StatusCode.PERMISSION_DENIED
    r = (await api.Get(req, FakeContext(["os:admin"]))).resource
    assert spec(r)["privateKey"] == "PRIVATE"
    r = (await api.Get(req, FakeContext())).resource  # no role metadata: local admin
    assert spec(r)["publicKey"] == "pub"
    e = await aborted(api.Get(req, FakeContext(["os:etcd:backup"])))
    assert e.code is grpc.StatusCode.PERMISSION_DENIED and e.details == "not authorized"
    # one role per talos-role value (never split): "x,os:admin" is not os:admin, nor a local caller
    for joined in ("x,os:admin", "os:reader,os:admin"):
        e = await aborted(api.Get(req, FakeContext([joined])))
        assert e.code is grpc.StatusCode.PERMISSION_DENIED, joined


async def test_list_with_label_and_id_queries(api):
    def ids(items: list[Any]) -> list[str]:
        return [i.resource.metadata.id for i in items]

    def zone(op: Any, value: str, invert: bool = False) -> resource_pb2.LabelQuery:
        return resource_pb2.LabelQuery(
            terms=[resource_pb2.LabelTerm(key="zone", op=op, value=[value], invert=invert)]
        )

    def peer_statuses(**options: Any) -> Any:
        request = state_pb2.ListRequest(type=KUBESPAN_PEER_STATUS, options=state_pb2.ListOptions(**options))
        return api.List(request, FakeContext())

    every = await collect(api.List(state_pb2.ListRequest(type=KUBESPAN_PEER_STATUS), FakeContext(READER)))
    assert ids(every) == ["key1=", "key2=", "key3="]
    got = await collect(peer_statuses(label_query=[zone(resource_pb2.LabelTerm.EQUAL, "a")]))
    assert ids(got) == ["key1=", "key2="]
    got = await collect(
        peer_statuses(
            label_query=[zone(resource_pb2.LabelTerm.IN, "b", invert=True)],
            id_query=resource_pb2.IDQuery(regexp="^key[2-3]"),
        )
    )
    assert ids(got) == ["key2="]
    e = await aborted(peer_statuses(label_query=[zone(resource_pb2.LabelTerm.LT, "b")]))
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT and "LT" in e.details


async def test_definitions_are_resources_in_meta(api):
    defs = await collect(
        api.List(
            state_pb2.ListRequest(namespace="meta", type="ResourceDefinitions.meta.cosi.dev"),
            FakeContext(READER),
        )
    )
    by_id = {d.resource.metadata.id: spec(d.resource) for d in defs}
    ksps = by_id[KUBESPAN_PEER_STATUS.lower()]
    assert "kubespanpeerstatuses" in ksps["allAliases"] and ksps["defaultNamespace"] == NS_KUBESPAN
    assert [c["name"] for c in ksps["printColumns"]] == ["Label", "Endpoint", "State", "Rx", "Tx"]
    assert by_id[KUBESPAN_IDENTITY.lower()]["sensitivity"] == "sensitive"


async def test_machine_config_yaml_spec_is_the_config_text(state):
    from machined.controllers import MachineConfigSpec

    cfg = MachineConfig.parse(config_yaml(cluster_id="c"))
    await state.create(
        Resource.new(NS_CONFIG, MACHINE_CONFIG, "v1alpha1", MachineConfigSpec(cfg)), owner="ctl"
    )
    r = (
        await StateServicer(state).Get(
            state_pb2.GetRequest(type="machineconfigs", id="v1alpha1"), FakeContext()
        )
    ).resource
    assert r.spec.yaml_spec == cfg.canonical_yaml() and "kind: KubeSpanConfig" in r.spec.yaml_spec


# --- Watch ------------------------------------------------------------------------------------------------


async def test_watch_bootstrap_then_changes(api, state):
    stream = api.Watch(
        state_pb2.WatchRequest(
            type=KUBESPAN_PEER_STATUS, options=state_pb2.WatchOptions(bootstrap_contents=True), api_version=1
        ),
        FakeContext(READER),
    )
    first = await stream.__anext__()
    kinds = [state_pb2.EventType.Name(e.event_type) for e in first.event]
    assert kinds == ["CREATED"] * 3 + ["BOOTSTRAPPED"]
    r = await state.get(NS_KUBESPAN, KUBESPAN_PEER_STATUS, "key1=")
    r.spec = {**r.spec, "state": "down"}
    await state.update(r, owner="ctl")
    async with asyncio.timeout(T):
        upd = (await stream.__anext__()).event[0]
    assert upd.event_type == state_pb2.UPDATED and spec(upd.resource)["state"] == "down"
    assert spec(upd.old)["state"] == "up"
    await state.destroy(NS_KUBESPAN, KUBESPAN_PEER_STATUS, "key2=", owner="ctl")
    async with asyncio.timeout(T):
        gone = (await stream.__anext__()).event[0]
    assert gone.event_type == state_pb2.DESTROYED and gone.resource.metadata.id == "key2="
    await stream.aclose()


async def test_watch_api_version_0_one_id_and_label_moves(api, state):
    # api_version 0: no BOOTSTRAPPED marker; one id only
    stream = api.Watch(
        state_pb2.WatchRequest(
            type=KUBESPAN_PEER_STATUS, id="key3=", options=state_pb2.WatchOptions(bootstrap_contents=True)
        ),
        FakeContext(),
    )
    first = await stream.__anext__()
    assert [(e.event_type, e.resource.metadata.id) for e in first.event] == [(state_pb2.CREATED, "key3=")]
    await stream.aclose()
    # a label-filtered watch: an update that leaves the selection is reported as DESTROYED
    q = resource_pb2.LabelQuery(
        terms=[resource_pb2.LabelTerm(key="zone", op=resource_pb2.LabelTerm.EQUAL, value=["a"])]
    )
    stream = api.Watch(
        state_pb2.WatchRequest(
            type=KUBESPAN_PEER_STATUS, options=state_pb2.WatchOptions(label_query=[q]), api_version=1
        ),
        FakeContext(),
    )
    task = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    r = await state.get(NS_KUBESPAN, KUBESPAN_PEER_STATUS, "key1=")
    r.metadata.labels = {"zone": "b"}
    await state.update(r, owner="ctl")
    async with asyncio.timeout(T):
        ev = (await task).event[0]
    assert ev.event_type == state_pb2.DESTROYED and ev.resource.metadata.id == "key1="
    await stream.aclose()


async def test_watch_refuses_what_it_cannot_do(api):
    e = await aborted(
        api.Watch(
            state_pb2.WatchRequest(type=KUBESPAN_PEER_STATUS, options=state_pb2.WatchOptions(tail_events=5)),
            FakeContext(),
        )
    )
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT and "tail_events" in e.details


async def test_a_watcher_that_falls_behind_gets_errored(state):
    stream = StateServicer(state).Watch(
        state_pb2.WatchRequest(type=KUBESPAN_PEER_STATUS, api_version=1), FakeContext()
    )
    task = asyncio.ensure_future(collect(stream))
    await asyncio.sleep(0.01)
    (w,) = state._watchers[(NS_KUBESPAN, KUBESPAN_PEER_STATUS)]
    w._limit = 2  # a tiny queue: the next burst overflows it
    for i in range(5):
        r = await state.get(NS_KUBESPAN, KUBESPAN_PEER_STATUS, "key1=")
        r.spec = {**r.spec, "receiveBytes": 100 + i}
        await state.update(r, owner="ctl")
    async with asyncio.timeout(T):
        got = await task
    last = got[-1].event[-1]
    assert last.event_type == state_pb2.ERRORED and "fell behind" in last.error


# --- the server on a unix socket -------------------------------------------------------------------------


async def test_server_on_a_unix_socket(state, tmp_path):
    path = tmp_path / "run" / "machine.sock"
    server = await serve(FakeNode("sock-node", tmp_path, state), path)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode) and (path.stat().st_mode & 0o777) == 0o660
        async with grpc.aio.insecure_channel(f"unix:{path}") as ch:
            m = machine_pb2_grpc.MachineServiceStub(ch)
            v = await m.Hostname(empty_pb2.Empty(), metadata=(("talos-role", "os:reader"),))
            assert v.messages[0].hostname == "sock-node"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await m.ApplyConfiguration(
                    machine_pb2.ApplyConfigurationRequest(), metadata=(("talos-role", "os:reader"),)
                )
            assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
            s = state_pb2_grpc.StateStub(ch)
            r = await s.Get(state_pb2.GetRequest(type="kubespanpeerstatuses", id="key1="))
            assert spec(r.resource)["label"] == "n1"
            for verb in ("Create", "Update", "Destroy", "Teardown", "TeardownAndDestroy"):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await ch.unary_unary(f"/cosi.resource.State/{verb}")(b"")
                assert (
                    e.value.code() is grpc.StatusCode.PERMISSION_DENIED and e.value.details() == WRITE_DENIED
                )
        # a second agent on the same socket is refused
        with pytest.raises(SocketInUse):
            await serve(FakeNode("sock-node", tmp_path, state), path)
    finally:
        await server.stop(0)
    assert not path.exists()


async def test_a_stale_socket_is_replaced(state, tmp_path):
    path = tmp_path / "machine.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # bound, never listening: what a killed agent leaves
    server = await serve(FakeNode("sock-node", tmp_path, state), path, mode=0o600, group=os.getgid())
    try:
        assert (path.stat().st_mode & 0o777) == 0o600 and path.stat().st_gid == os.getgid()
    finally:
        await server.stop(0)

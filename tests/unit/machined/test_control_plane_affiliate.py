"""The affiliate's ``control_plane`` (field 8, ``ControlPlane.api_server_port`` = 1; issue 16 item 11).

Talos control planes publish it with ``cluster.controlPlane.localAPIServerPort`` (0 or unset: 6443); workers
do not. machined does the same from its machine config, ``kubespan run --control-plane-port`` publishes it
from a plain node, remote values are decoded, and the Affiliate and Member resources show it as Talos's
``controlPlane: {port: N}``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from discovery.crypto import endpoint_from_addr
from kubespan import cli
from kubespan.affiliate import RemoteAffiliate, build_local_affiliate
from kubespan.constants import MeshConfig
from kubespan.dataplane.fake import FakeLinkManager, FakeNftManager
from kubespan.engine import Mesh, MeshOptions
from kubespan.hostinfo import StaticHost
from kubespan.identity import LinkInfo, generate_private_key, ula_prefix
from kubespan.snapshot import MeshSnapshot
from kubespan.testing import Discovered, FakeDiscovery, FakeProber
from kubespan.wireguard.fake import FakeWireGuard
from machined.config import ConfigValidationError, MachineConfig
from machined.config.testing import config_yaml
from machined.config.yamlio import dump_documents, load_documents
from machined.controllers import AffiliateController, MemberController
from machined.runtime import Runtime
from machined.state import DEFINITIONS, State, register_all
from machined.state.catalog import AFFILIATE, MEMBER, NS_CLUSTER
from spanapi.discovery.client import affiliate_pb2
from spanutil.testing import eventually

CLUSTER = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo="
SECRET = "0s0kXnX3mC5vX1tVYt2m4o8Rz7kqYw2m5c8l0a3b6dE="
FIELD_8 = b"\x42"  # tag of Affiliate field 8, wire type 2 (length-delimited)


def local(api_server_port: int | None) -> Any:
    return build_local_affiliate(
        node_id="n1",
        nodename="cp1",
        hostname="cp1",
        public_key=generate_private_key().public_key(),
        mesh_address=ula_prefix(CLUSTER)[1],
        node_addresses=["10.5.0.2/24"],
        listen_port=51820,
        machine_type="controlplane",
        api_server_port=api_server_port,
    )


# --- the wire ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", [6443, 443, 65535])
def test_control_plane_is_encoded_as_field_8_and_decoded_back(port: int) -> None:
    pb = local(port).to_pb()
    assert pb.HasField("control_plane") and pb.control_plane.api_server_port == port
    raw = pb.SerializeToString()
    # field 8 holds a ControlPlane whose field 1 (varint) is the port: what Talos's discovery client decodes
    inner = affiliate_pb2.ControlPlane(api_server_port=port).SerializeToString()
    assert inner[0] == 0x08  # field 1, varint
    assert FIELD_8 + bytes([len(inner)]) + inner in raw
    again = affiliate_pb2.Affiliate.FromString(raw)
    assert RemoteAffiliate.from_pb(again).api_server_port == port


def test_no_control_plane_when_not_given() -> None:
    pb = local(None).to_pb()
    assert not pb.HasField("control_plane")
    assert (
        RemoteAffiliate.from_pb(affiliate_pb2.Affiliate.FromString(pb.SerializeToString())).api_server_port
        is None
    )


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_a_port_out_of_range_is_refused_naming_it(port: int) -> None:
    with pytest.raises(ValueError, match="api_server_port"):
        local(port)


# --- machine config -> what the mesh publishes --------------------------------------------------------


def config(machine_type: str, control_plane: dict[str, Any] | None) -> str:
    docs = load_documents(config_yaml(secret=SECRET, machine_type=machine_type))
    if control_plane is not None:
        docs[0]["cluster"]["controlPlane"] = control_plane
    return dump_documents(docs)


@pytest.mark.parametrize(
    ("machine_type", "control_plane", "published"),
    [
        ("controlplane", None, 6443),  # Talos's DefaultControlPlanePort
        ("controlplane", {"endpoint": "https://cp.example:6443"}, 6443),
        ("controlplane", {"localAPIServerPort": 0}, 6443),  # 0 = the default, as Talos
        ("controlplane", {"localAPIServerPort": 443}, 443),
        ("init", {"localAPIServerPort": 7443}, 7443),  # init is a control plane
        ("worker", {"localAPIServerPort": 443}, None),  # workers never publish it
        ("worker", None, None),
    ],
)
def test_machine_config_control_planes_publish_the_local_api_server_port(
    machine_type: str, control_plane: dict[str, Any] | None, published: int | None
) -> None:
    cfg = MachineConfig.parse(config(machine_type, control_plane))
    assert cfg.mesh().api_server_port == published
    assert cfg.mesh_options("h").api_server_port == published


@pytest.mark.parametrize("bad", [65536, -1, "6443", True])
def test_a_bad_local_api_server_port_names_the_field(bad: Any) -> None:
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.parse(config("controlplane", {"localAPIServerPort": bad}))
    (p,) = e.value.problems
    assert p.location == "v1alpha1.cluster.controlPlane.localAPIServerPort"


def test_kubespan_run_control_plane_port_flag() -> None:
    required = ["run", "--cluster-id", "c", "--discovery", "http://127.0.0.1:3000", "--state-dir", "/tmp/ks"]
    ns = cli.build_parser().parse_args([*required, "--control-plane-port", "6443"])
    assert cli.mesh_options(ns, MeshConfig(), bytes(32)).api_server_port == 6443
    ns = cli.build_parser().parse_args(required)
    assert cli.mesh_options(ns, MeshConfig(), bytes(32)).api_server_port is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*required, "--control-plane-port", "0"])


# --- engine -> discovery, and the resources ---------------------------------------------------------------


def remote(i: int, addr: str, port: int | None) -> Discovered:
    a = affiliate_pb2.Affiliate(
        node_id=f"node-{i}", nodename=f"n{i}", hostname=f"h{i}", machine_type="controlplane"
    )
    a.addresses.append(ipaddress.ip_address(addr).packed)
    a.kubespan.public_key = generate_private_key().public_key().b64
    a.kubespan.address = ula_prefix(CLUSTER)[i].packed
    if port is not None:
        a.control_plane.api_server_port = port
    return Discovered(f"node-{i}", a, (endpoint_from_addr(ipaddress.ip_address(addr), 51820),))


class Host:
    def __init__(self, m: Mesh) -> None:
        self.m = m

    def snapshot(self) -> MeshSnapshot | None:
        return self.m.snapshot


async def test_the_engine_publishes_it_and_the_resources_show_it(tmp_path: Path) -> None:
    t = [1000.0]
    disc = FakeDiscovery()
    m = Mesh(
        MeshOptions(
            cluster_id=CLUSTER,
            cluster_secret=bytes(32),
            state_dir=tmp_path / "s",
            nodename="self",
            machine_type="controlplane",
            api_server_port=6443,
            first_contact=None,
        ),
        backend=FakeWireGuard(clock=lambda: t[0]),
        links=FakeLinkManager(link_exists=True),
        nft=FakeNftManager(),
        host=StaticHost(
            [LinkInfo("eth0", bytes.fromhex("2e1ab6538169"), physical=True)],
            [ipaddress.ip_interface("10.5.0.1/24")],
        ),
        discovery=disc,
        prober=FakeProber(),
        clock=lambda: t[0],
        wall=lambda: t[0] + 1e9,
    )
    disc.put(remote(2, "10.5.0.2", 443), remote(3, "10.5.0.3", None))
    s = State()
    register_all(s, DEFINITIONS)
    rt = Runtime(s)
    affiliates, members = AffiliateController(Host(m), lambda: "controlplane"), MemberController()  # type: ignore[arg-type]
    rt.register(affiliates)
    rt.register(members)
    await m.start()
    try:
        await m.reconcile()
        published = disc.published[-1][0]
        assert published.HasField("control_plane") and published.control_plane.api_server_port == 6443
        async with rt:
            rt.wake(affiliates.name)

            async def three_members() -> bool:
                return len(await s.list(NS_CLUSTER, MEMBER)) == 3

            await eventually(three_members, "a member per affiliate")
            affs = {r.metadata.id: r.spec for r in await s.list(NS_CLUSTER, AFFILIATE)}
            assert affs[m.node_id]["controlPlane"] == {"port": 6443}
            assert affs["node-2"]["controlPlane"] == {"port": 443}
            assert "controlPlane" not in affs["node-3"]  # Talos: omitempty
            mems = {r.metadata.id: r.spec for r in await s.list(NS_CLUSTER, MEMBER)}
            assert mems["self"]["controlPlane"] == {"port": 6443}
            assert mems["n2"]["controlPlane"] == {"port": 443}
            assert "controlPlane" not in mems["n3"]
    finally:
        await m.stop()

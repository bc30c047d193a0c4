"""apid and spanctl across network namespaces (root): one apid fans out to three machined nodes in
two NATed clouds, and a node that goes down becomes an error entry while the others answer.

Lab (see machined_lab): discovery on the lab internet; cloud a (behind nat-a) holds n1 (control
plane) and n2 (worker); cloud b (behind nat-b) holds n3 (worker). Every node runs machined and apid
as real processes with configs from ``machined.gen`` (an ECDSA P-256 cluster CA). The operator is a
host on the internet; it reaches n1's apid through a TCP port forward on nat-a's public address (in
n1's certSANs). n1's apid forwards to n2 over cloud a's LAN and to n3's node address 10.2.0.11, which
only the mesh can reach (KubeSpan routes peers' node addresses through the tunnel). The workers get
their server certificates from n1's trustd by CSR and machine token, finding it through the
control-plane member that discovery reports (no --trustd-endpoint).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from machined_lab import CLOUDS, DISC, PY, Agent, build, full_mesh, json_objects, kill_node, wait

from machined import gen, pki
from netns.lab import Lab, Node
from netns.nat import PortForward

pytestmark = pytest.mark.root

PUBLIC_A = CLOUDS["a"][1]  # nat-a's address on the lab internet
OPERATOR = f"{CLOUDS['a'][1].rsplit('.', 1)[0]}.3"


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def write_configs(agents: list[Agent], lab: Lab) -> tuple[Path, str]:
    """controlplane config for n1, worker configs for n2/n3, the operator's talosconfig."""
    g = gen.gen_config(
        "lab",
        f"https://{PUBLIC_A}:6443",
        gen.gen_secrets(),
        discovery=[f"http://{DISC}:3000"],
        endpoints=[PUBLIC_A],
        cert_sans=[PUBLIC_A],
    )
    for a in agents:
        docs = list(yaml.safe_load_all(g.controlplane if a.index == 1 else g.worker))
        a.cluster_id = docs[0]["cluster"]["id"]
        pki.write_secret_file(a.config, yaml.safe_dump_all([*docs, a.agent_config()], sort_keys=False))
    tc = lab.dir / "talosconfig"
    pki.write_secret_file(tc, g.talosconfig)
    return tc, docs[0]["machine"]["token"]


def start_apid(a: Agent) -> None:
    a.node.popen(
        PY, "-m", "machined.apid.main", "--config", str(a.config), "--machined-socket", str(a.socket),
        "--hostname", a.name, "--trustd-wait", "240",
        log=a.node.lab.dir / f"apid-{a.name}.log",
    )  # fmt: skip


def apid_logs(lab: Lab, agents: list[Agent], n: int = 15) -> str:
    out = []
    for a in agents:
        path = lab.dir / f"apid-{a.name}.log"
        lines = path.read_text(errors="replace").splitlines()[-n:] if path.exists() else []
        out.append(f"--- apid {a.name}\n" + "\n".join(lines))
    return "\n".join(out)


def spanctl(op: Node, tc: Path, nodes: list[str], *args: str, timeout: float = 90):
    return op.run(
        PY, "-m", "machined.spanctl.main", "--talosconfig", str(tc), "-e", PUBLIC_A, "-n", ",".join(nodes),
        *args, check=False, timeout=timeout,
    )  # fmt: skip


def test_fan_out_through_one_apid_to_three_netns_nodes_with_one_down(lab: Lab) -> None:
    agents = build(lab, {"a": ["n1", "n2"], "b": ["n3"]},
                   forwards={"a": [PortForward(50000, "10.1.0.11:50000", "tcp")]})  # fmt: skip
    n1, n2, n3 = agents
    op = lab.node("op")
    lab.attach(op, lab.internet(), [f"{OPERATOR}/24"])
    tc, token = write_configs(agents, lab)
    for a in agents:
        a.start()
        start_apid(a)
    ips = [a.ip for a in agents]

    wait("full mesh", lambda: full_mesh(agents), 120, agents)

    last: list[str] = []

    def answers() -> str | None:
        r = spanctl(op, tc, ips, "service", timeout=60)
        last[:] = [f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"]
        return r.stdout if r.returncode == 0 and all(ip in r.stdout for ip in ips) else None

    try:
        out = wait("every node answers through n1's apid", answers, 240, agents, every=2)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- last spanctl\n{''.join(last)}\n{apid_logs(lab, agents)}") from None

    # the table: NODE first, UPPERCASE headers, each row labelled with the node as typed
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["NODE", "SERVICE"], out
    assert {ln.split()[0] for ln in lines[1:]} == set(ips), out

    # the workers' server certificates came from n1's trustd, found through discovery
    for w in (n2, n3):
        log = (lab.dir / f"apid-{w.name}.log").read_text()
        assert "server certificate from trustd" in log and "discovered control-plane members" in log, log
        assert token not in log

    version = spanctl(op, tc, ips, "version")
    assert version.returncode == 0, version.stderr
    for ip in ips:
        assert f"NODE:        {ip}" in version.stdout, version.stdout

    mesh = spanctl(op, tc, ips, "mesh")
    assert mesh.returncode == 0, mesh.stderr
    rows = [ln.split() for ln in mesh.stdout.strip().splitlines()]
    assert rows[0] == ["NODE", "n1", "n2", "n3"], mesh.stdout
    assert sorted(r[0] for r in rows[1:]) == sorted(ips)
    assert all(sorted(r[1:]) == ["-", "up", "up"] for r in rows[1:]), mesh.stdout

    peers = spanctl(op, tc, ips, "get", "kubespanpeerstatuses", "-o", "json")
    assert peers.returncode == 0, peers.stderr
    items = json_objects(peers.stdout)
    assert sorted({i["node"] for i in items}) == sorted(ips), peers.stdout
    assert len(items) == 6 and all(i["spec"]["state"] == "up" for i in items), peers.stdout

    # n3 goes down (machined, apid, wireguard-go killed): two answers and one error entry. Each call
    # waits out its deadline for n3 (packets to it vanish in the tunnel): both at once, not one after
    # the other.
    kill_node(n3.node)
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        svc_call = pool.submit(spanctl, op, tc, ips, "service")
        down = spanctl(op, tc, ips, "version")
        took = time.monotonic() - t0
        svc = svc_call.result()
    assert down.returncode != 0
    for ip in (n1.ip, n2.ip):
        assert f"NODE:        {ip}" in down.stdout, down.stdout
    assert f"NODE:        {n3.ip}" not in down.stdout
    errors = [ln for ln in down.stderr.splitlines() if n3.ip in ln]
    assert len(errors) == 1, down.stderr
    assert svc.returncode != 0
    assert {ln.split()[0] for ln in svc.stdout.strip().splitlines()[1:]} == {n1.ip, n2.ip}, svc.stdout
    assert n3.ip in svc.stderr, svc.stderr
    print(f"fan-out with n3 down answered in {took:.1f}s; stderr: {down.stderr.strip()}")

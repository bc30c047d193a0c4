"""Run-time impairments: loss and blackholes with nftables, delay with tc netem.

Each one is a :class:`Handle` whose ``remove()`` undoes exactly what it added (nft rules by handle, the
netem qdisc), so impairments can be stacked and lifted independently while processes keep running.

Drops behave like a lossy wire: nobody gets an error. They are made in ``netdev kslab_impair`` tables at
the *ingress* of the receiving end of the veth:

* traffic a node sends on ``eth0`` is dropped where it arrives: at the veth's other end (in the segment's
  switch namespace or the linked node). Dropping in the sender itself does not work: an ``inet``
  output/postrouting drop makes ``sendto`` fail with EPERM, and a netdev ``egress`` drop returns ENOBUFS,
  which iputils ping (and others) quietly retry;
* traffic a node receives is dropped at its own interface's ingress, before IP and conntrack.

Forwarded packets are covered too: an impairment on a router's ``wan0`` impairs the path through it.
Interfaces the lab did not create (a WireGuard or TUN device) have no known other end; their outbound
drops fall back to a netdev ``egress`` chain on the device (the sender may see ENOBUFS).

The interface is ``ifname``, else the one the node routes ``dst`` through, else every interface the lab
created in the node.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from netns.errors import LabError, NetemUnavailableError

if TYPE_CHECKING:
    from netns.lab import Node

TABLE = "kslab_impair"


def _nft(ns: str, *args: str, check: bool = True, input: bytes | None = None) -> str:
    r = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args], capture_output=True, input=input, timeout=30
    )
    if check and r.returncode != 0:
        raise LabError(f"nft {' '.join(args)} in {ns} failed: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout.decode(errors="replace")


@dataclass(eq=False)
class Handle:
    """Something applied at run time (nft rules, a netem qdisc); ``remove()`` undoes exactly that and is
    idempotent. The lab removes whatever is left when it closes."""

    node: Node
    description: str
    rules: list[tuple[str, str, str, str, int]] = field(
        default_factory=list
    )  # ns, family, table, chain, handle
    qdisc_dev: str | None = None
    removed: bool = False

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        for ns, family, table, chain, handle in self.rules:
            _nft(ns, "delete", "rule", family, table, chain, "handle", str(handle), check=False)
        if self.qdisc_dev is not None:
            self.node.run("tc", "qdisc", "del", "dev", self.qdisc_dev, "root", check=False)
        with contextlib.suppress(ValueError):
            self.node.lab._handles.remove(self)

    def packets(self) -> int:
        """Packets counted so far by this handle's nft rules (for drops: how many were dropped)."""
        total = 0
        for ns, family, table, chain, handle in self.rules:
            for line in _nft(ns, "-a", "list", "chain", family, table, chain, check=False).splitlines():
                if line.rstrip().endswith(f"# handle {handle}"):
                    m = re.search(r"counter packets (\d+)", line)
                    total += int(m.group(1)) if m else 0
        return total

    def __repr__(self) -> str:
        return f"<Handle {self.node.name}: {self.description}{' (removed)' if self.removed else ''}>"


def add_rule(ns: str, family: str, table: str, chain: str, expr: list[str], handle: Handle) -> None:
    """Append one rule in namespace ``ns`` and record it in ``handle`` (nft echoes the rule's handle)."""
    out = _nft(ns, "--echo", "--handle", "add", "rule", family, table, chain, *expr)
    m = re.search(r"# handle (\d+)", out)
    if m is None:
        raise LabError(f"nft did not echo a rule handle: {out!r}")
    handle.rules.append((ns, family, table, chain, int(m.group(1))))


def parse_dst(dst: str | None) -> tuple[str | None, int | None]:
    """``"10.0.0.2"``, ``"10.0.0.0/24"``, ``"fd00::1"``, ``"10.0.0.2:51820"``, ``"[fd00::1]:51820"``
    -> (network or address, port)."""
    if dst is None:
        return None, None
    if dst.startswith("["):
        host, _, port = dst[1:].partition("]:")
        return str(ipaddress.ip_address(host)), int(port)
    if dst.count(":") == 1:
        host, _, port = dst.partition(":")
        return str(ipaddress.ip_address(host)), int(port)
    return str(ipaddress.ip_network(dst, strict=False)), None


def _matches(out: bool, net: str | None, port: int | None, proto: str) -> list[str]:
    """Selectors for packets the node sends (``out``) or receives, towards / from ``net`` and ``port``."""
    m: list[str] = []
    if net is not None:
        fam = "ip6" if ipaddress.ip_network(net).version == 6 else "ip"
        m += [fam, "daddr" if out else "saddr", net]
    if port is not None:
        if proto not in ("udp", "tcp"):
            raise LabError(f"impairment protocol must be udp or tcp, not {proto!r}")
        m += [proto, "dport" if out else "sport", str(port)]
    return m


def _devices(node: Node, ifname: str | None, net: str | None) -> list[str]:
    if ifname is not None:
        return [ifname]
    if net is not None:
        probe = str(ipaddress.ip_network(net)[0])
        out = node.run("ip", "route", "get", probe, check=False).stdout.split()
        if "dev" in out:
            return [out[out.index("dev") + 1]]
        raise LabError(f"{node.name} has no route to {net}: pass ifname")
    if not node.links:
        raise LabError(f"{node.name} has no lab-made interfaces: pass ifname")
    return list(node.links)


def _chain(ns: str, dev: str, hook: str) -> str:
    """The netdev base chain on ``dev`` in ``ns`` for ``hook`` (ingress/egress), created on first use."""
    name = f"{hook}_{re.sub(r'[^A-Za-z0-9_]', '_', dev)}"
    if _nft(ns, "list", "chain", "netdev", TABLE, name, check=False) == "":
        spec = (  # nft 1.0.6 wants the newlines
            f"table netdev {TABLE} {{\n  chain {name} {{\n"
            f'    type filter hook {hook} device "{dev}" priority 0; policy accept;\n  }}\n}}\n'
        )
        _nft(ns, "-f", "-", input=spec.encode())
    return name


def nft_drop(
    node: Node,
    *,
    percent: float,
    dst: str | None,
    ifname: str | None,
    port: int | None,
    proto: str,
    direction: str,
    what: str,
) -> Handle:
    if direction not in ("out", "in", "both"):
        raise LabError(f"direction must be out, in or both, not {direction!r}")
    if not 0 < percent <= 100:
        raise LabError(f"loss percent must be in (0, 100], not {percent}")
    n = round(percent)
    if n < 1:
        raise LabError(f"loss is modelled in whole percent (numgen random mod 100), not {percent}")
    net, dst_port = parse_dst(dst)
    port = dst_port if port is None else port
    rand = [] if n >= 100 else ["numgen", "random", "mod", "100", "<", str(n)]
    devs = _devices(node, ifname, net)
    imp = Handle(node, f"{what} {direction} dst={dst} dev={','.join(devs)} port={port}")
    try:
        for dev in devs:
            for out in {"out": [True], "in": [False], "both": [True, False]}[direction]:
                expr = [*_matches(out, net, port, proto), *rand, "counter", "drop"]
                if not out:
                    where = (node.ns, dev, "ingress")
                elif dev in node.links:
                    peer_ns, peer_dev = node.links[dev]
                    where = (peer_ns, peer_dev, "ingress")
                else:
                    where = (node.ns, dev, "egress")
                add_rule(where[0], "netdev", TABLE, _chain(*where), expr, imp)
    except BaseException:
        imp.remove()
        raise
    node.lab._handles.append(imp)
    return imp


@functools.cache
def netem_available() -> str | None:
    """None when ``tc ... netem`` works on this kernel, else the reason (probed once in a scratch netns)."""
    ns = f"ks{os.getpid()}xnetem"  # the lab naming scheme, so cleanup_stale() covers a crash here
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=10)
        r = subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return None if r.returncode == 0 else _netem_reason(r.stderr)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _netem_reason(stderr: str) -> str:
    return f"tc said {stderr.strip()!r} (kernel lacks sch_netem: no module, not built in)"


def netem_delay(node: Node, ms: float, jitter_ms: float, ifname: str) -> Handle:
    spec = ["delay", f"{ms}ms", *([f"{jitter_ms}ms"] if jitter_ms else [])]
    r = node.run("tc", "qdisc", "add", "dev", ifname, "root", "netem", *spec, check=False)
    if r.returncode != 0:
        if "unknown" in r.stderr.lower() or "not supported" in r.stderr.lower():
            raise NetemUnavailableError(f"netem not available: {_netem_reason(r.stderr)}")
        raise LabError(f"tc netem on {node.name}/{ifname} failed: {r.stderr.strip()}")
    imp = Handle(node, f"delay {ms}ms±{jitter_ms}ms on {ifname}", qdisc_dev=ifname)
    node.lab._handles.append(imp)
    return imp

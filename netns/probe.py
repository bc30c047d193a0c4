"""Traffic helpers between lab nodes, all bounded by counts and timeouts.

* :func:`ping`: loss percentage and round-trip times;
* :func:`tcp_transfer`: bytes a one-shot server received and how long it took;
* :class:`Ping` / :func:`longest_gap`: a background ``ping -D`` and the longest time between its replies;
* :func:`udp_echo` / :func:`udp_mapped`: a tiny STUN-like echo server that answers every datagram with the
  source address it saw, and a client that asks several of them from one socket (how NAT mappings are
  observed).

Every function takes a :class:`~netns.lab.Node` or anything with a ``.node`` (e.g. ``MeshNode``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from netns.errors import LabError

if TYPE_CHECKING:
    from netns.lab import Node

PY = sys.executable


class _HasNode(Protocol):
    @property
    def node(self) -> Node: ...


def as_node(x: Node | _HasNode) -> Node:
    from netns.lab import Node

    return x if isinstance(x, Node) else x.node


class PingResult(NamedTuple):
    sent: int
    received: int
    loss: float  # percent, 0..100
    rtts: list[float]  # milliseconds, one per reply

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent


_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_RTT = re.compile(r"time=([\d.]+) ms")


def ping(
    src: Node | _HasNode, dst: str, count: int = 5, timeout: float = 2, interval: float = 0.2
) -> PingResult:
    """``count`` echo requests from ``src`` to address ``dst``; never takes much longer than
    ``count * interval + timeout``. An unreachable destination gives 100 % loss, not an exception."""
    node = as_node(src)
    # no -w: with -w, ping keeps sending past -c until it has -c replies
    r = node.run(
        "ping",
        "-6" if ":" in dst else "-4",
        "-n",
        "-c",
        str(count),
        "-i",
        str(interval),
        "-W",
        str(max(1, int(timeout))),
        dst,
        check=False,
        timeout=count * (interval + 0.05) + timeout + 10,
    )
    m = _SUMMARY.search(r.stdout)
    if m is None:
        if r.returncode not in (0, 1, 2) or "unknown host" in r.stderr.lower():
            raise LabError(f"ping {dst} from {node.name} failed: {r.stderr.strip() or r.stdout.strip()}")
        return PingResult(count, 0, 100.0, [])
    sent, received = int(m.group(1)), int(m.group(2))
    rtts = [float(x) for x in _RTT.findall(r.stdout)]
    return PingResult(sent, received, 100.0 * (sent - received) / sent if sent else 100.0, rtts)


class Transfer(NamedTuple):
    received: int  # bytes the server read before EOF
    seconds: float  # server side, from accept to EOF (0 when nothing connected)
    error: str = ""  # the client's error, if it failed


_TCP_SERVER = """
import json, socket, sys, time
addr, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); s.settimeout(timeout)
print("ready", flush=True)
n, took = 0, 0.0
try:
    c, _ = s.accept(); c.settimeout(timeout); t0 = time.monotonic()
    while True:
        b = c.recv(1 << 16)
        if not b: break
        n += len(b)
    took = time.monotonic() - t0
except OSError as e:
    print(f"server: {e!r}", file=sys.stderr)
print(json.dumps([n, took]), flush=True)
"""

_TCP_CLIENT = """
import socket, sys, time
addr, port, size, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
end = time.monotonic() + timeout
while True:
    try:
        c = socket.create_connection((addr, port), timeout=max(0.5, end - time.monotonic())); break
    except OSError:
        if time.monotonic() > end: raise
        time.sleep(0.1)
c.settimeout(max(0.5, end - time.monotonic()))
chunk = b"x" * (1 << 16)
left = size
while left > 0:
    k = c.send(chunk[: min(left, len(chunk))])
    left -= k
c.close()
"""


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def tcp_transfer(
    src: Node | _HasNode,
    dst_node: Node | _HasNode,
    dst_addr: str,
    size: int = 1 << 20,
    timeout: float = 30,
    port: int = 7788,
    bind: str | None = None,
) -> Transfer:
    """Send ``size`` bytes from ``src`` to a one-shot server on ``dst_node`` at ``dst_addr:port``.

    The server binds ``bind`` (default ``dst_addr``; ``""`` for any, e.g. behind a port forward where the
    client connects to the router). Bounded: the whole call returns within about ``2 * timeout``; a path
    that does not work gives ``received == 0`` and the client's error, not an exception.
    """
    s_node, c_node = as_node(dst_node), as_node(src)
    listen = dst_addr if bind is None else bind
    srv = subprocess.Popen(
        s_node.argv(PY, "-c", _TCP_SERVER, listen, str(port), str(timeout), private_run=False),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = _read_line(srv, 10)
        if first != "ready":
            srv.kill()
            _, err = srv.communicate(timeout=5)
            raise LabError(f"tcp server on {s_node.name} did not start: {first} {err.strip()}")
        client = c_node.run(
            PY,
            "-c",
            _TCP_CLIENT,
            dst_addr,
            str(port),
            str(size),
            str(timeout),
            check=False,
            timeout=timeout + 10,
        )
        error = client.stderr.strip().splitlines()[-1] if client.returncode != 0 and client.stderr else ""
        out, _ = srv.communicate(timeout=timeout + 10)
        received, seconds = json.loads(out.strip().splitlines()[-1]) if out.strip() else (0, 0.0)
        return Transfer(int(received), float(seconds), error)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(5)
        for f in (srv.stdout, srv.stderr):
            if f is not None:
                f.close()


_UDP_ECHO = """
import socket, sys, time
addr, port, lifetime = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, port)); s.settimeout(0.5)
print("ready", flush=True)
end = time.monotonic() + lifetime
while time.monotonic() < end:
    try:
        data, peer = s.recvfrom(2048)
    except socket.timeout:
        continue
    seen = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
    print(seen, flush=True)
    s.sendto(seen.encode(), peer[:2])
"""


@dataclass
class UdpEcho:
    """A running echo server; ``seen()`` lists the source addresses of the datagrams it got, in order."""

    node: Node
    addr: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def seen(self) -> list[str]:
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line for line in lines if line and line != "ready"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def udp_echo(node: Node | _HasNode, addr: str, port: int = 3478, lifetime: float = 120) -> UdpEcho:
    """Start a UDP echo server on ``addr:port`` in ``node`` that answers each datagram with the source
    ``ip:port`` it saw and logs it; it exits after ``lifetime`` seconds or at lab close."""
    n = as_node(node)
    log = n.lab.dir / f"udp-echo-{n.name}-{port}.log"
    proc = n.popen(PY, "-u", "-c", _UDP_ECHO, addr, str(port), str(lifetime), log=log, private_run=False)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if log.exists() and "ready" in log.read_text():
            return UdpEcho(n, addr, port, proc, log)
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait(5)
    raise LabError(
        f"udp echo on {n.name} {addr}:{port} did not start: {log.read_text() if log.exists() else ''}"
    )


_UDP_MAPPED = """
import json, socket, sys
targets, bind, sport, timeout, tries = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
def parse(t):
    if t.startswith("["):
        h, _, p = t[1:].partition("]:")
    else:
        h, _, p = t.rpartition(":")
    return h, int(p)
fam = socket.AF_INET6 if ":" in (bind or parse(targets[0])[0]) else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((bind, sport)); s.settimeout(timeout)
out = []
for t in targets:
    dst, got = parse(t), None
    for _ in range(tries):
        s.sendto(b"probe", dst)
        try:
            while True:
                data, peer = s.recvfrom(2048)
                if (peer[0], peer[1]) == dst:
                    got = data.decode(); break
        except socket.timeout:
            continue
        break
    out.append(got)
print(json.dumps([s.getsockname()[1], out]))
"""


def udp_mapped(
    node: Node | _HasNode,
    targets: list[str],
    sport: int = 0,
    bind: str = "",
    timeout: float = 1.0,
    tries: int = 3,
) -> list[str | None]:
    """From ONE UDP socket in ``node`` (bound to ``bind:sport``), ask each ``udp_echo`` target
    (``"ip:port"`` / ``"[v6]:port"``) which source address it saw; None where no answer came.

    EIM NAT: the same external ``ip:port`` for every target; symmetric NAT: a different one per target.
    With ``tries=1`` and no echo server behind the target this is a plain "send one datagram"."""
    n = as_node(node)
    r = n.run(
        PY,
        "-c",
        _UDP_MAPPED,
        json.dumps(targets),
        bind,
        str(sport),
        str(timeout),
        str(tries),
        timeout=len(targets) * tries * timeout + 10,
    )
    return json.loads(r.stdout)[1]


@dataclass
class Ping:
    """A bounded background ping (``ping -D``), stopped with SIGINT; replies parsed afterwards."""

    proc: subprocess.Popen[bytes]
    out: Path
    interval: float

    @classmethod
    def start(cls, node: Node, target: str, interval: float, count: int, name: str) -> Ping:
        out = node.lab.dir / f"ping-{name}.txt"
        argv = node.argv(
            "stdbuf", "-oL", "ping", "-6" if ":" in target else "-4", "-D", "-n", "-W", "1",
            "-i", str(interval), "-c", str(count), target,
            private_run=False,
        )  # fmt: skip
        with out.open("wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        node.procs.append(proc)  # killed by the lab if the test fails first
        return cls(proc, out, interval)

    def replies(self) -> dict[int, float]:
        """icmp_seq -> wall-clock time of the reply."""
        got: dict[int, float] = {}
        for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", self.out.read_text(), re.M):
            got.setdefault(int(m.group(2)), float(m.group(1)))
        return got

    def stop(self, timeout: float = 10) -> tuple[int, int]:
        """Stop (if still running) and return (transmitted, received) from ping's summary ((-1, -1): none)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", self.out.read_text())
        return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def longest_gap(replies: dict[int, float], after: float) -> float:
    """Longest time between consecutive replies, counting from the last reply at or before ``after``."""
    times = sorted(replies.values())
    start = max((t for t in times if t <= after), default=after)
    later = [t for t in times if t > start]
    gaps = [b - a for a, b in zip([start, *later], later, strict=False)]
    return max(gaps, default=float("inf"))

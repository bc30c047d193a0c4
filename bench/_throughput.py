"""TCP throughput between lab nodes, shared by the throughput benchmarks (mesh_throughput, relay_throughput).

:func:`transfer` is one bounded TCP transfer (a Python sender writing 64 KiB chunks in the source node, a
receiver in the destination node; throughput is the bytes received over the receiver's time from accept
to EOF). :func:`measure` runs rounds of one transfer per path, the paths taking turns (which goes first
rotating, so none always follows another), prints a line per round and returns the rates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from _meshlab import cpu_seconds, median

from netns.lab import LabError, Node

PORT = 5201

_SERVER = """
import json, socket, sys, time
addr, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); s.settimeout(timeout)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(timeout); t0 = time.monotonic(); n = 0
buf = bytearray(1 << 18)
while True:
    k = c.recv_into(buf)
    if not k: break
    n += k
print(json.dumps([n, time.monotonic() - t0]), flush=True)
"""

_CLIENT = """
import socket, sys, time
addr, port, size, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
c = socket.create_connection((addr, port), timeout=10)
end = time.monotonic() + seconds
chunk = memoryview(b"x" * (1 << 16))
left = size
while left > 0 and time.monotonic() < end:
    left -= c.send(chunk[: min(left, len(chunk))])
c.close()
"""


def transfer(src: Node, dst: Node, addr: str, size: int, seconds: float) -> tuple[int, float]:
    srv = subprocess.Popen(
        dst.argv(sys.executable, "-c", _SERVER, addr, str(PORT), str(seconds + 20), private_run=False),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert srv.stdout is not None
        if srv.stdout.readline().strip() != "ready":
            raise LabError(
                f"transfer server on {dst.name} did not start: {srv.stderr.read() if srv.stderr else ''}"
            )
        src.run(sys.executable, "-c", _CLIENT, addr, str(PORT), str(size), str(seconds), timeout=seconds + 30)
        out, err = srv.communicate(timeout=seconds + 30)
        if srv.returncode != 0:
            raise LabError(f"transfer server on {dst.name} failed: {err.strip()}")
        n, took = json.loads(out.strip().splitlines()[-1])
        return int(n), float(took)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(5)


@dataclass(frozen=True)
class Path:
    kind: str  # the label its rates are kept under
    src: Node
    dst: Node
    addr: str  # the destination's address the transfer goes to


@dataclass
class Rates:
    mbit: dict[str, list[float]] = field(default_factory=dict)  # per kind, one rate (Mbit/s) per round
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of the watched pids during each kind
    wall: dict[str, float] = field(default_factory=dict)  # seconds of each kind's transfers, summed

    def median(self, kind: str) -> float:
        return median(self.mbit.get(kind, []))

    def summary(self, kind: str, label: str | None = None, width: int = 8) -> str:
        xs = self.mbit[kind]
        rounds = ", ".join(f"{x:.0f}" for x in xs)
        return f"{label or kind:{width}s}: median {median(xs):5.0f} Mbit/s (rounds: {rounds})"


def measure(
    paths: Sequence[Path],
    rounds: int,
    size: int,
    seconds: float,
    ratio: tuple[str, str],
    watch: Sequence[int] = (),
) -> Rates:
    """``rounds`` rounds of one :func:`transfer` per path (``size`` bytes or ``seconds``, whichever ends
    first), path order rotating; each round's line ends with the ``ratio[0]``/``ratio[1]`` rate ratio.
    With ``watch``, the CPU those pids use during each transfer is added up per kind."""
    out = Rates()
    for r in range(rounds):
        order = list(paths[r % len(paths) :]) + list(paths[: r % len(paths)])
        line = []
        for p in order:
            cpu0 = cpu_seconds(watch)
            n, took = transfer(p.src, p.dst, p.addr, size, seconds)
            out.cpu[p.kind] = out.cpu.get(p.kind, 0.0) + cpu_seconds(watch) - cpu0
            out.wall[p.kind] = out.wall.get(p.kind, 0.0) + took
            rate = n * 8 / took / 1e6
            out.mbit.setdefault(p.kind, []).append(rate)
            line.append(f"{p.kind} {rate:4.0f} Mbit/s ({n / (1 << 20):.0f} MiB/{took:.1f} s)")
        num, den = ratio
        each = out.mbit[num][-1] / out.mbit[den][-1]
        print(f"  round {r + 1}: " + ", ".join(line) + f"; {num}/{den} {each:.3f}", flush=True)
    return out

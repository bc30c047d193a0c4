"""A UDP reflector, and UDP sockets opened inside lab nodes, to watch NAT mappings from both ends.

The reflector answers every datagram with the source ``ip:port`` it saw (a STUN Binding without the STUN),
so a node asking two reflectors on different addresses from one socket learns whether its NAT maps
endpoint-independently. Run it in a namespace with ``python -m netns.reflect --addr A --port N``; it prints
nothing and exits after ``--lifetime`` seconds or on SIGTERM. :func:`start` does that in a lab node and
returns once it answers.

:func:`udp_socket` opens a socket inside a node from this process (a socket keeps the namespace it was
made in), so a test can send from one source port, wait for unsolicited packets and compare, with no
helper process per step.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from netns.errors import LabError
from spanutil.hostport import split_host_port

if TYPE_CHECKING:
    from netns.lab import Node

_CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")


def format_addr(peer: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``ip:port``, or ``[v6]:port``."""
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr(text: str) -> tuple[str, int]:
    """The inverse of :func:`format_addr`."""
    return split_host_port(text, port_zero=True)


def serve(sock: socket.socket, lifetime: float) -> None:
    """Answer each datagram on ``sock`` with the source address it came from, for ``lifetime`` seconds."""
    end = time.monotonic() + lifetime
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(min(0.5, left))
        try:
            _, peer = sock.recvfrom(2048)
        except TimeoutError:
            continue
        sock.sendto(format_addr(peer).encode(), peer[:2])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m netns.reflect",
        description="Answer every UDP datagram with the source ip:port it came from; print nothing.",
    )
    ap.add_argument("--addr", default="0.0.0.0", help="address to bind (default: any IPv4)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--lifetime", type=float, default=120, help="seconds before exiting (default 120)")
    args = ap.parse_args(argv)
    family = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((args.addr, args.port))
        serve(sock, args.lifetime)
    return 0


def in_netns(ns: str, make: Callable[[], _T]) -> _T:
    """Call ``make`` in a throwaway thread that has joined network namespace ``ns`` (setns affects only
    the calling thread); what it returns, e.g. a socket, keeps that namespace and works from any thread."""
    result: dict[str, object] = {}

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = make()
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=work, name=f"netns-{ns}")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


def in_node(node: Node, make: Callable[[], _T]) -> _T:
    """:func:`in_netns` in ``node``'s network namespace."""
    return in_netns(node.ns, make)


def udp_socket(node: Node, addr: str = "0.0.0.0", port: int = 0) -> socket.socket:
    """A UDP socket bound to ``addr:port`` inside ``node``; the caller closes it."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((addr, port))
        except OSError:
            s.close()
            raise
        return s

    return in_node(node, make)


def ask(sock: socket.socket, target: str, timeout: float = 1.0, tries: int = 3) -> str | None:
    """Send a probe from ``sock`` to the reflector at ``target`` and return the ``ip:port`` it saw,
    or None when no answer came in ``tries`` attempts; datagrams from anyone else are discarded."""
    dst = parse_addr(target)
    for _ in range(tries):
        sock.sendto(b"probe", dst)
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, peer = sock.recvfrom(2048)
            except TimeoutError:
                break
            if peer[:2] == dst:
                return data.decode()
    return None


def receive(sock: socket.socket, timeout: float) -> list[tuple[bytes, str]]:
    """Every datagram ``sock`` gets within ``timeout`` seconds, with its source address."""
    got = []
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, peer = sock.recvfrom(2048)
        except TimeoutError:
            break
        got.append((data, format_addr(peer)))
    return got


def start(node: Node, addr: str, port: int, lifetime: float = 120) -> subprocess.Popen[bytes]:
    """Run a reflector on ``addr:port`` in ``node`` (stopped at lab close) and return once it answers."""
    proc = node.popen(
        sys.executable,
        "-m",
        "netns.reflect",
        "--addr",
        addr,
        "--port",
        str(port),
        "--lifetime",
        str(lifetime),
        private_run=False,
    )
    with udp_socket(node, "::" if ":" in addr else "0.0.0.0") as probe:
        end = time.monotonic() + 10
        while time.monotonic() < end and proc.poll() is None:
            if ask(probe, format_addr((addr, port)), timeout=0.1, tries=1) is not None:
                return proc
    proc.kill()
    proc.wait(5)
    raise LabError(f"reflector on {node.name} {addr}:{port} did not answer (exit {proc.returncode})")


if __name__ == "__main__":
    sys.exit(main())

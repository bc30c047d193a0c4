"""``python -m kubespan.relay``: a standalone relay forwarder with allocations given on the command line.

    python -m kubespan.relay --listen 0.0.0.0 --alloc KEY_A,KEY_B [--alloc ...] [--status-file PATH]

Prints one JSON line per allocation (``{"ports": [port_a, port_b], "key_a": ..., "key_b": ...}``), then
``{"ready": true}``; logs go to stderr. With ``--status-file`` the allocations' counters are rewritten
there (atomically) every ``--status-interval`` seconds and at exit. Runs until SIGTERM or SIGINT. The
mesh's own relay (allocations requested over the tunnel) comes with the engine integration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from kubespan.relay.allocation import Limits
from kubespan.relay.forwarder import Forwarder, RelayError, RelayLimits
from kubespan.wireguard.types import InvalidKeyError, PublicKey
from spanutil.durations import parse_duration
from spanutil.fsutil import write_atomic
from spanutil.logs import setup


def _key_pair(text: str) -> tuple[PublicKey, PublicKey]:
    a, sep, b = text.partition(",")
    if not sep:
        raise argparse.ArgumentTypeError("takes KEY_A,KEY_B (two base64 WireGuard public keys)")
    try:
        return PublicKey.from_b64(a), PublicKey.from_b64(b)
    except InvalidKeyError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port_range(text: str) -> range:
    lo, _, hi = text.partition("-")
    try:
        first, last = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not PORT or FIRST-LAST") from None
    if not 1 <= first <= last <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} must lie within 1-65535, first <= last")
    return range(first, last + 1)


def build_parser() -> argparse.ArgumentParser:
    d = Limits()
    p = argparse.ArgumentParser(prog="python -m kubespan.relay", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--listen", default="0.0.0.0", help="address the relay ports bind to (default %(default)s)"
    )
    p.add_argument("--alloc", type=_key_pair, action="append", default=[], metavar="KEY_A,KEY_B")
    p.add_argument("--ports", type=_port_range, default=None, help="port range for allocations, FIRST-LAST")
    p.add_argument("--idle-timeout", type=parse_duration, default=d.idle_timeout, help="default 180s")
    p.add_argument("--packet-rate", type=float, default=d.packet_rate, help="per allocation, packets/s")
    p.add_argument("--packet-burst", type=float, default=d.packet_burst)
    p.add_argument("--byte-rate", type=float, default=d.byte_rate, help="per allocation, bytes/s")
    p.add_argument("--byte-burst", type=float, default=d.byte_burst)
    p.add_argument("--max-allocations", type=int, default=RelayLimits().max_allocations)
    p.add_argument("--status-file", type=Path, default=None)
    p.add_argument("--status-interval", type=parse_duration, default=1.0)
    p.add_argument("--debug", action="store_true")
    return p


async def run(ns: argparse.Namespace) -> int:
    limits = Limits(ns.idle_timeout, ns.packet_rate, ns.packet_burst, ns.byte_rate, ns.byte_burst)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Forwarder(ns.listen, limits, RelayLimits(ns.max_allocations), ports=ns.ports) as fwd:
        for key_a, key_b in ns.alloc:
            port_a, port_b = await fwd.allocate(key_a, key_b)
            print(json.dumps({"ports": [port_a, port_b], "key_a": key_a.b64, "key_b": key_b.b64}), flush=True)
        print(json.dumps({"ready": True}), flush=True)

        def dump() -> None:
            if ns.status_file is not None:
                status = {"allocations": fwd.status(), "expired": fwd.expired}
                write_atomic(ns.status_file, json.dumps(status) + "\n", mode=0o644)

        while not stop.is_set():
            dump()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ns.status_interval)
        dump()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    setup(ns.debug)
    try:
        return asyncio.run(run(ns))
    except (RelayError, ValueError) as e:
        print(f"relay: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

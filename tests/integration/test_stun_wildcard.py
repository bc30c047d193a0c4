"""The discovery service's STUN responder on a wildcard address of a multi-homed host (root, one lab
namespace): each reply leaves from the address its request was sent to, over IPv4, IPv6 and IPv4 on a
dual-stack socket. A control shows the kernel alone would pick another source here."""

from __future__ import annotations

import json
import sys

import pytest

from netns import Lab

pytestmark = pytest.mark.root

SCRIPT = """
import asyncio, json, socket
from discovery.server.stun import RateTable, StunResponder, serve
from spanutil import stun

async def ask(family, client, server, port):
    loop = asyncio.get_running_loop()
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((client, 0)); s.setblocking(False)
        txid = stun.new_transaction_id()
        await loop.sock_sendto(s, stun.binding_request(txid), (server, port))
        data, src = await asyncio.wait_for(loop.sock_recvfrom(s, 2048), 2)
        return [src[0], str(stun.parse_binding_response(data, txid))]

async def main():
    out = {}
    for host in ("0.0.0.0", "::"):
        listener, port = await serve(host, 0, StunResponder(RateTable(0), RateTable(0)))
        out[host + " v4"] = await ask(socket.AF_INET, "10.1.0.1", "10.1.0.2", port)
        if host == "::":
            out[host + " v6"] = await ask(socket.AF_INET6, "fd00::1", "fd00::2", port)
        listener.close()
    # control: a plain wildcard socket answering with sendto leaves from the kernel's choice
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); plain.bind(("0.0.0.0", 0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.bind(("10.1.0.1", 0)); c.settimeout(2)
        c.sendto(b"x", ("10.1.0.2", plain.getsockname()[1]))
        _, addr = plain.recvfrom(10); plain.sendto(b"y", addr)
        out["control"] = c.recvfrom(10)[1][0]
    print(json.dumps(out))

asyncio.run(main())
"""


def test_wildcard_listener_replies_from_the_address_asked():
    with Lab() as lab:
        n = lab.node("srv")
        for addr in ("10.1.0.1/32", "10.1.0.2/32", "fd00::1/128", "fd00::2/128"):
            n.addr("lo", addr)
        out = json.loads(n.run(sys.executable, "-c", SCRIPT, timeout=30).stdout)
    assert out["control"] == "10.1.0.1", out  # the kernel alone answers from the client's own address
    assert out["0.0.0.0 v4"][0] == "10.1.0.2", out
    assert out[":: v4"][0] == "10.1.0.2", out
    assert out[":: v6"][0] == "fd00::2", out
    assert out["0.0.0.0 v4"][1].startswith("10.1.0.1:") and out[":: v6"][1].startswith("[fd00::1]:")
